"""Accuracy, size, latency and memory of one model folder, measured the same way for every
model: the teacher, every candidate (PyTorch, ONNX, int8) and the floor.

``evaluate_model`` opens the folder with ``modelfolder.runners.open_model``; latency comes from
``latency``, the machine description from ``machine``.
"""

from __future__ import annotations

import gc
import logging
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from bertshrink.config.params import EvaluateParams
from bertshrink.config.recipes import EVALUATION_SPLITS
from bertshrink.errors import MissingArtifactError
from bertshrink.evaluation.latency import fixed_threads, latency_texts, measure_latency
from bertshrink.evaluation.machine import machine_info
from bertshrink.modelfolder.runners import open_model, require_model_dir
from bertshrink.modelfolder.size import size_on_disk

log = logging.getLogger(__name__)

# Subtrees of evaluate_model's result that are descriptions, not metrics.
NON_METRIC_KEYS = ("machine", "size.files", "model_dir", "predictions")


def classification_metrics(labels: Sequence[int], predictions: Sequence[int],
                           num_labels: int) -> dict:
    """Accuracy and macro-F1 (over classes present in labels or predictions), and ``n``."""
    y_true, y_pred = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    # Labels outside the model's head mean data and model disagree: fail, don't score silently.
    bad = y_true[(y_true < 0) | (y_true >= num_labels)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is outside the model's {num_labels} classes")
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": int(len(y_true)),
    }


def reset_peak_memory() -> bool:
    """Reset the process's peak-RSS mark (Linux: ``5`` into /proc/self/clear_refs).

    Lets one process measure the peak of one model's evaluation even after it trained a model.
    Returns False where the kernel does not allow it; the peak is then the process's lifetime peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float | None:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0  # kB
    return None


def current_memory_mb() -> float | None:
    """Resident memory now, in MiB (None where /proc is missing)."""
    return _proc_status_mb("VmRSS")


def peak_memory_mb() -> float:
    """Peak resident memory of the process since the last reset (or since start), in MiB."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


# --------------------------------------------------------------------------- evaluation


def evaluate_model(model_dir: Path, splits: dict[str, pd.DataFrame], params: EvaluateParams,
                   seed: int = 0, eval_splits: Sequence[str] = EVALUATION_SPLITS) -> dict:
    """Accuracy on ``eval_splits``, size, parameter count, latency per batch size, peak memory."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    require_model_dir(model_dir)  # the usual failure, so report it before data problems
    missing = [s for s in eval_splits if s not in splits]
    if missing:
        raise MissingArtifactError(
            f"Prepared data lacks split(s) {missing}. Run the data stage first "
            "(`python -m flows.prepare` or `dvc repro prepare`)."
        )
    gc.collect()
    peak_is_this_model = reset_peak_memory()  # else: a lifetime peak, and the result says so
    # What the process already held (e.g. after training in the same process), so the model's
    # own share shows as the increase.
    baseline_mb = current_memory_mb()
    runner = open_model(model_dir, params.threads)
    if params.max_length > runner.max_length_limit:
        log.warning("max_length %d exceeds what %s supports; using %d", params.max_length,
                    model_dir, runner.max_length_limit)
        params = params.model_copy(update={"max_length": runner.max_length_limit})
    metrics, predictions = {}, {}
    with fixed_threads(params.threads):
        for name in eval_splits:
            df = splits[name]
            predictions[name] = runner.predict(df["text"].astype(str).tolist(), params.eval_batch_size,
                                               params.max_length)
            metrics[name] = classification_metrics(df["label"].to_numpy(), predictions[name],
                                                   runner.num_labels)
    texts = latency_texts(splits, eval_splits)
    latency = {f"batch_{b}": measure_latency(runner, runner.tokenizer, texts, b, params, seed)
               for b in params.batch_sizes}
    peak = peak_memory_mb()
    return {
        "model_dir": str(model_dir),
        "metrics": metrics,
        # Class ids per split, in split order: agreement with the teacher is computed from these.
        "predictions": {name: [int(x) for x in p] for name, p in predictions.items()},
        "parameters": runner.num_parameters(),
        "size": size_on_disk(model_dir),
        "latency": latency,
        "peak_memory_mb": peak,
        "memory_baseline_mb": baseline_mb,
        "peak_memory_increase_mb": None if baseline_mb is None else peak - baseline_mb,
        "peak_memory_scope": "evaluation" if peak_is_this_model else "process lifetime",
        "machine": machine_info(params.threads),
        "eval_seconds": time.perf_counter() - start,
    }


def _skipped(key: str, skip: Sequence[str]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in skip)


def flat_metrics(result: Mapping[str, Any], skip: Sequence[str] = NON_METRIC_KEYS) -> dict:
    """Numeric leaves as ``"test.accuracy"``, ``"latency.batch_1.p50_ms"``, ... -> float.

    ``metrics`` is dropped from the prefix (``test.accuracy``, not ``metrics.test.accuracy``);
    machine description and per-file sizes are left out (log them as params / artifacts); NaN
    values are kept so a missing measurement is visible.
    """
    flat: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if _skipped(prefix, skip):
            return
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (int, float, np.integer, np.floating)) and not isinstance(
                node, (bool, np.bool_)):
            flat[prefix] = float(node)

    for key, value in result.items():
        walk(value, "" if key == "metrics" else key)
    return flat


