"""Accuracy, size, latency and memory of one model folder, measured the same way for every
candidate (teacher, distilled students, and later ONNX / int8 exports).

A model folder is what ``save_pretrained`` writes for ``AutoModelForSequenceClassification``
(``config.json``, weights, tokenizer files). ``load_runner`` picks how to run it from what the
folder holds; a runner exposes ``tokenizer``, ``return_tensors``, ``max_length_limit``,
``forward(encoded) -> logits``, ``logits``, ``predict`` and ``num_parameters``.

Importing this module has no side effects: torch threads are only changed inside measurements
and restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import platform
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score

from bertshrink.errors import MissingArtifactError, ModelSourceError
from bertshrink.modeling import count_parameters
from bertshrink.params import EvaluateParams

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Weight files a user ships; ``*.onnx.data`` / ``*.onnx_data`` hold external ONNX tensors.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx.data", ".onnx_data", ".joblib")
CONFIG_FILES = frozenset({CONFIG_FILE, "generation_config.json", "model.safetensors.index.json",
                          "pytorch_model.bin.index.json"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
})
# Training leftovers that match a weight suffix or sit next to the model but are never shipped.
NOT_SHIPPED_FILES = frozenset({
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt",
    "trainer_state.json", "bertshrink.json",
})
NOT_SHIPPED_DIRS = frozenset({"checkpoints", "runs", "logs", "mlruns", ".ipynb_checkpoints"})
# CPU features that decide int8 / bf16 speed; cpuinfo spells VNNI both ways across versions.
CPU_FLAGS = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx512_bf16": ("avx512_bf16",),
    "amx_tile": ("amx_tile",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "arm_dotprod": ("asimddp", "dotprod"),
}
# Subtrees of evaluate_model's result that are descriptions, not metrics.
NON_METRIC_KEYS = ("machine", "size.files", "model_dir", "predictions")


# --------------------------------------------------------------------------- machine


@functools.lru_cache(maxsize=1)
def _cpu_info() -> dict:
    # py-cpuinfo takes ~1 s (it may spawn a subprocess), so ask once per process.
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception as err:  # noqa: BLE001 - machine info must never fail an evaluation
        log.warning("py-cpuinfo failed (%s); falling back to platform", err)
        return {}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - optional dependency
        return None


def machine_info(threads: int) -> dict:
    """CPU, core counts, int8-relevant CPU flags and library versions, for comparing runs."""
    import psutil

    info = _cpu_info()
    flags = {f.lower() for f in info.get("flags", [])}
    return {
        "cpu_model": info.get("brand_raw") or platform.processor() or platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "threads": threads,
        "cpu_flags": {name: any(s in flags for s in spellings)
                      for name, spellings in CPU_FLAGS.items()},
        "torch": torch.__version__,
        "torch_quantized_engine": torch.backends.quantized.engine,
        "onnxruntime": _version("onnxruntime"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


# --------------------------------------------------------------------------- accuracy & size


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


def _is_shipped(rel: Path) -> bool:
    if any(d in NOT_SHIPPED_DIRS or d.startswith("checkpoint-") for d in rel.parts[:-1]):
        return False
    name = rel.name
    if name in NOT_SHIPPED_FILES or name.startswith("rng_state"):
        return False
    return name.endswith(WEIGHT_SUFFIXES) or name in CONFIG_FILES or name in TOKENIZER_FILES


def size_on_disk(model_dir: Path) -> dict:
    """Bytes of what a user would ship: weights, config and tokenizer files (no training state)."""
    model_dir = Path(model_dir)
    files: dict[str, int] = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_file() and _is_shipped(rel):
            files[rel.as_posix()] = path.stat().st_size
    weights = sum(b for name, b in files.items() if name.endswith(WEIGHT_SUFFIXES))
    return {"total_bytes": sum(files.values()), "weights_bytes": weights, "files": files}


# --------------------------------------------------------------------------- runners


class _TextRunner:
    """Texts -> logits / class ids in batches; subclasses give ``forward``, ``tokenizer``, ``num_labels``."""

    def logits(self, texts: Sequence[str], batch_size: int, max_length: int) -> np.ndarray:
        """Logits for raw texts, tokenized in batches of ``batch_size``."""
        out = [self.forward(_encode(self, texts[i:i + batch_size], max_length))
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_labels), dtype=np.float32)

    def predict(self, texts: Sequence[str], batch_size: int, max_length: int) -> np.ndarray:
        """Predicted class ids."""
        return self.logits(texts, batch_size, max_length).argmax(axis=-1)


class TorchClassifier(_TextRunner):
    """Runs a ``save_pretrained`` folder with PyTorch on CPU, in eval and inference mode."""

    return_tensors = "pt"

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        from bertshrink.structure import load_classifier

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # Pruned heads / FFN widths are not expressible in a standard config; this restores them.
        model = load_classifier(self.model_dir)
        self.model = model.to("cpu").eval()
        self.num_labels = int(self.model.config.num_labels)
        self.max_length_limit = _max_length_limit(self.tokenizer, self.model.config)

    def forward(self, encoded: Mapping[str, Any]) -> np.ndarray:
        """Logits for already-tokenized inputs; this is the part latency measures."""
        with torch.inference_mode():
            return self.model(**encoded).logits.float().numpy()

    def num_parameters(self) -> int:
        return count_parameters(self.model)


class OnnxClassifier(_TextRunner):
    """Runs an exported folder (``model.onnx`` + tokenizer + config) with ONNX Runtime on CPU."""

    return_tensors = "np"

    def __init__(self, model_dir: Path, threads: int):
        import json
        from types import SimpleNamespace

        from transformers import AutoTokenizer

        from bertshrink.onnx_export import ONNX_FILE, make_session

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        config = json.loads((self.model_dir / CONFIG_FILE).read_text())
        self.session = make_session(self.model_dir / ONNX_FILE, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
        positions = SimpleNamespace(max_position_embeddings=config.get("max_position_embeddings"))
        self.max_length_limit = _max_length_limit(self.tokenizer, positions)

    def forward(self, encoded: Mapping[str, Any]) -> np.ndarray:
        """Logits for already-tokenized inputs (only the graph's declared inputs, as int64)."""
        feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names}
        return self.session.run([self.output_name], feed)[0]

    def num_parameters(self) -> int:
        """Values in weight initializers (int8 ones included; scales and zero points skipped)."""
        import onnx

        from bertshrink.onnx_export import ONNX_FILE

        graph = onnx.load(str(self.model_dir / ONNX_FILE), load_external_data=False).graph
        return sum(int(np.prod(t.dims)) for t in graph.initializer
                   if len(t.dims) >= 2 and int(np.prod(t.dims)) >= 64)


class SklearnClassifier(_TextRunner):
    """Runs the floor (``model.joblib``: TF-IDF + logistic regression); featurisation is inside ``forward``."""

    return_tensors = "np"

    def __init__(self, model_dir: Path):
        from bertshrink.floor import PassThroughTokenizer, load_floor

        self.model_dir = Path(model_dir)
        self.pipeline = load_floor(self.model_dir)
        self.tokenizer = PassThroughTokenizer()
        self.num_labels = len(self.pipeline.classes_)
        self.max_length_limit = self.tokenizer.model_max_length

    def forward(self, encoded: Mapping[str, Any]) -> np.ndarray:
        """Log-probabilities per class (same argmax as logits), from raw texts."""
        return self.pipeline.predict_log_proba(encoded["texts"])

    def num_parameters(self) -> int:
        from bertshrink.floor import floor_parameters

        return floor_parameters(self.pipeline)


def _max_length_limit(tokenizer, config) -> int:
    # Tokenizers saved without model_max_length report ~1e30; the position table is the limit.
    limits = [x for x in (getattr(config, "max_position_embeddings", None),
                          tokenizer.model_max_length)
              if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits, default=1_000_000)


def _encode(runner, texts: Sequence[str], max_length: int):
    """Truncate at ``max_length``, pad to the longest text in the batch (not to max_length)."""
    return runner.tokenizer(list(texts), truncation=True, max_length=max_length,
                            padding="longest", return_tensors=runner.return_tensors)


def _require_model_dir(model_dir: Path) -> None:
    if not (model_dir / CONFIG_FILE).is_file():
        what = "does not exist" if not model_dir.is_dir() else f"has no {CONFIG_FILE}"
        raise MissingArtifactError(
            f"Model folder {model_dir} {what}. Train the teacher first: "
            "`python -m flows.teacher` (or `dvc repro teacher`)."
        )


def load_runner(model_dir: Path, params: EvaluateParams):
    """The runner for what ``model_dir`` holds; unknown contents are a ``ModelSourceError``."""
    model_dir = Path(model_dir)
    _require_model_dir(model_dir)
    names = {p.name for p in model_dir.iterdir()}
    # Checked before torch weights, since an export folder may also keep them.
    if "model.onnx" in names:
        return OnnxClassifier(model_dir, params.threads)
    if "model.joblib" in names:
        return SklearnClassifier(model_dir)
    if names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json"}:
        return TorchClassifier(model_dir)
    raise ModelSourceError(
        f"Don't know how to run {model_dir}: expected model.onnx, model.joblib, model.safetensors or pytorch_model.bin "
        f"next to {CONFIG_FILE}, found {sorted(names)}."
    )


# --------------------------------------------------------------------------- speed & memory


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` intra-op torch threads inside the block, then restore the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _draw(rng: np.random.Generator, texts: Sequence[str], n: int) -> list[str]:
    # Without replacement when there are enough texts, so a batch holds n distinct examples.
    idx = rng.choice(len(texts), size=n, replace=len(texts) < n)
    return [texts[i] for i in idx]


def sample_sequence_lengths(tokenizer, texts: Sequence[str], max_length: int, n: int,
                            seed: int) -> list[int]:
    """Token counts (special tokens included, truncated at ``max_length``) of ``n`` seeded draws."""
    if not texts:
        raise ValueError("no texts to sample sequence lengths from")
    drawn = _draw(np.random.default_rng(seed), list(texts), n)
    ids = tokenizer(drawn, truncation=True, max_length=max_length)["input_ids"]
    return [len(x) for x in ids]


def _encode_batch(runner, tokenizer, texts: Sequence[str], max_length: int):
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest",
                     return_tensors=runner.return_tensors)


def _time_once(runner, encoded) -> float:
    """Milliseconds of one forward pass (tokenization excluded)."""
    start = time.perf_counter()
    runner.forward(encoded)
    return (time.perf_counter() - start) * 1000.0


def time_forward(runner, tokenizer, texts: Sequence[str], batch_size: int, params: EvaluateParams,
                 seed: int) -> tuple[list[float], list[int]]:
    """Forward-pass times (ms) and padded sequence lengths of seeded batches of real texts.

    Each batch is ``batch_size`` texts drawn from ``texts``, truncated at ``params.max_length``
    and padded to its longest member, so sequence lengths follow the real data. Only the forward
    pass is timed: tokenization is excluded. ``params.warmup_iterations`` batches run untimed
    first (allocator and kernel warm-up). The same seed draws the same batches for every model.
    """
    if not texts:
        raise ValueError("no texts to measure latency on")
    texts = list(texts)
    rng = np.random.default_rng(seed)
    times_ms: list[float] = []
    seq_lens: list[int] = []
    with fixed_threads(params.threads):
        for i in range(params.warmup_iterations + params.timed_iterations):
            encoded = _encode_batch(runner, tokenizer, _draw(rng, texts, batch_size), params.max_length)
            elapsed = _time_once(runner, encoded)
            if i >= params.warmup_iterations:
                times_ms.append(elapsed)
                seq_lens.append(int(encoded["input_ids"].shape[1]))
    return times_ms, seq_lens


def latency_summary(times_ms: Sequence[float], seq_lens: Sequence[int], batch_size: int) -> dict:
    """p50/p95/mean latency, throughput and the mean padded length of timed batches."""
    mean_ms = float(np.mean(times_ms))
    return {
        "batch_size": batch_size,
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "mean_ms": mean_ms,
        "throughput_eps": batch_size / (mean_ms / 1000.0),
        "mean_seq_len": float(np.mean(seq_lens)),
        "iterations": len(times_ms),
    }


def measure_latency(runner, tokenizer, texts: Sequence[str], batch_size: int,
                    params: EvaluateParams, seed: int) -> dict:
    """Latency of ``runner.forward`` (see ``time_forward``), summarised."""
    times_ms, seq_lens = time_forward(runner, tokenizer, texts, batch_size, params, seed)
    return latency_summary(times_ms, seq_lens, batch_size)


def compare_latency(model_dirs: Mapping[str, Path], texts: Sequence[str], params: EvaluateParams,
                    seed: int = 0, runners: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """Latency of several models measured interleaved, batch by batch, so they share the machine's state.

    On a shared machine the speed drifts by tens of percent over seconds to minutes; models timed
    one after another absorb that drift into their ratios. Here every drawn batch is run by every
    model, back to back, in an order that rotates with each batch. Returns
    ``{name: {"batch_<b>": summary}}``. ``runners`` (name -> runner) skips loading, for tests.
    """
    runners = dict(runners) if runners is not None else {
        name: load_runner(Path(d), params) for name, d in model_dirs.items()}
    names = list(runners)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to measure latency on")
    results: dict[str, dict] = {name: {} for name in names}
    with fixed_threads(params.threads):
        for batch_size in params.batch_sizes:
            rng = np.random.default_rng(seed)
            times = {name: [] for name in names}
            lens = {name: [] for name in names}
            for i in range(params.warmup_iterations + params.timed_iterations):
                batch = _draw(rng, texts, batch_size)
                for k in range(len(names)):
                    name = names[(i + k) % len(names)]
                    runner = runners[name]
                    encoded = _encode_batch(runner, runner.tokenizer, batch, params.max_length)
                    elapsed = _time_once(runner, encoded)
                    if i >= params.warmup_iterations:
                        times[name].append(elapsed)
                        lens[name].append(int(encoded["input_ids"].shape[1]))
            for name in names:
                results[name][f"batch_{batch_size}"] = latency_summary(times[name], lens[name], batch_size)
    return results


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


def latency_texts(splits: Mapping[str, pd.DataFrame], eval_splits: Sequence[str] = ("validation", "test")) -> list[str]:
    # Latency uses the real test texts; fall back to the last evaluated split.
    name = "test" if "test" in splits else eval_splits[-1]
    return splits[name]["text"].astype(str).tolist()


def evaluate_model(model_dir: Path, splits: dict[str, pd.DataFrame], params: EvaluateParams,
                   seed: int = 0, eval_splits: Sequence[str] = ("validation", "test")) -> dict:
    """Accuracy on ``eval_splits``, size, parameter count, latency per batch size, peak memory."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    _require_model_dir(model_dir)  # the usual failure, so report it before data problems
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
    runner = load_runner(model_dir, params)
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


def cpu_features(machine: Mapping[str, Any]) -> str:
    """The CPU features int8 speed depends on (onnxruntime #6695), as 'avx2 yes, avx512_vnni yes, amx_int8 no'."""
    flags = machine.get("cpu_flags", {})
    return ", ".join(f"{name} {'yes' if flags.get(name) else 'no'}" for name in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"))
