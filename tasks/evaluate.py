"""Prefect task for the evaluate stage: the same code measures the teacher and every candidate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import TEACHER, Artifacts, model_name as name_of
from bertshrink.config.params import EvaluateParams
from bertshrink.data.prepare import PreparedData, load_prepared
from bertshrink.config.recipes import REPORTED_SPLIT, SELECTION_SPLIT
from bertshrink.evaluation.behaviour import behaviour_report, disagreement_table, fidelity
from bertshrink.evaluation.latency import compare_latency, latency_texts, ratios
from bertshrink.evaluation.machine import machine_info
from bertshrink.evaluation.metrics import evaluate_model, flat_metrics
from bertshrink.evaluation.noise import noise_note
from bertshrink.modelfolder.meta import read_meta_or_default
from bertshrink.modelfolder.size import content_fingerprint, size_on_disk
from tracking.runs import log_artifact, log_metrics, log_params, set_tags


def teacher_reference(paths: Artifacts, model_name: str, own: dict) -> tuple[dict | None, dict | None]:
    """The teacher's predictions and per-split metrics (its own for the teacher); None if it was not evaluated."""
    if model_name == TEACHER:
        return own["predictions"], own["metrics"]
    files = paths.predictions(TEACHER), paths.metrics(TEACHER)
    if not all(f.is_file() for f in files):
        print(f"bertshrink: note: {files[0]} missing: evaluate the teacher first for agreement and retention "
              "(`python -m flows.evaluate`).", file=sys.stderr)
        return None, None
    predictions, metrics = (json.loads(f.read_text()) for f in files)
    return predictions, metrics["metrics"]


def _on(split: str, predictions: dict | None, metrics: dict | None) -> tuple[list[int] | None, float | None]:
    if predictions is None or metrics is None:
        return None, None
    return predictions.get(split), (metrics.get(split) or {}).get("accuracy")


def add_behaviour(result: dict, prepared: PreparedData, paths: Artifacts, model_name: str) -> tuple[dict, Path | None]:
    """Into ``result``: ``selection`` (validation accuracy, agreement and retention: what the promotion
    rule judges) and ``behaviour`` (the same on test, per-class and per-length accuracy: what reports
    show); the test disagreements as CSV."""
    teacher_predictions, teacher_metrics = teacher_reference(paths, model_name, result)
    labels = prepared.splits[SELECTION_SPLIT]["label"].to_numpy()
    result["selection"] = {"split": SELECTION_SPLIT, **fidelity(
        labels, result["predictions"][SELECTION_SPLIT], *_on(SELECTION_SPLIT, teacher_predictions, teacher_metrics))}
    test = prepared.splits[REPORTED_SPLIT]
    texts, labels = test["text"].astype(str).tolist(), test["label"].to_numpy()
    teacher_test, teacher_accuracy = _on(REPORTED_SPLIT, teacher_predictions, teacher_metrics)
    ours = result["predictions"][REPORTED_SPLIT]
    result["behaviour"] = behaviour_report(texts, labels, ours, prepared.label_names, teacher_test, teacher_accuracy)
    if teacher_test is None or model_name == TEACHER:
        return result, None
    table = disagreement_table(texts, labels, ours, teacher_test, prepared.label_names)
    out = paths.disagreements(model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return result, out


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model_task(model_dir: str, evaluate: EvaluateParams, paths: Artifacts, seed: int, run_id: str) -> dict:
    """Accuracy, behaviour next to the teacher, size, latency and memory of one model folder.

    Writes ``metrics/<model>.json`` (+ MLflow), the predictions and the disagreements with the
    teacher (``tasks.repeats`` adds the spread over seeds for a recipe's candidate).
    """
    model_name = name_of(model_dir)
    paths.require_writable(paths.metrics(model_name).parent, paths.predictions(model_name).parent,
                           paths.disagreements(model_name).parent)
    prepared = load_prepared(paths.prepared)
    result = evaluate_model(Path(model_dir), prepared.splits, evaluate, seed=seed)
    meta = read_meta_or_default(Path(model_dir))
    if meta.peer:  # a peer tool's model (benchmarks/peers.py): reports label it with the tool and versions
        result["peer"] = meta.peer
    result.update({"model": model_name, "evaluation_run_id": run_id, "data_content_hash": prepared.content_hash,
                   "format": meta.format_label,
                   # which model these figures belong to: register and promote refuse them for any other
                   "model_fingerprint": content_fingerprint(Path(model_dir))})
    result, disagreements = add_behaviour(result, prepared, paths, model_name)
    predictions = paths.predictions(model_name)
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text(json.dumps(result.pop("predictions")))
    out = paths.metrics(model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    log_params(run_id, {f"evaluate.{k}": v for k, v in evaluate.model_dump(mode="json").items()})
    log_metrics(run_id, flat_metrics(result))
    set_tags(run_id, {"model": model_name, "data.content_hash": prepared.content_hash,
                      **{f"machine.{k}": v for k, v in result.get("machine", {}).items()}})
    log_artifact(run_id, out)
    if disagreements is not None:
        log_artifact(run_id, disagreements, "disagreements")
    return result


def log_noise(run_id: str, noise: dict) -> None:
    """The noise guard's verdict on the run: tag ``comparison.noisy`` (+ the reasons) and its figures as metrics."""
    set_tags(run_id, {"comparison.noisy": str(noise["noisy"]).lower(),
                      "comparison.noise_reasons": "; ".join(noise["reasons"]) or "none"})
    log_metrics(run_id, {"comparison.busy_cores_elsewhere": noise["busy_cores_elsewhere"],
                         "comparison.max_ratio_spread": noise["max_ratio_spread"],
                         "comparison.attempts": sum(noise["attempts"].values()),
                         "comparison.noisy": float(noise["noisy"])})


@task(name="compare-latency", cache_policy=NO_CACHE)
def compare_latency_task(model_dirs: list[str], evaluate: EvaluateParams, paths: Artifacts, seed: int, run_id: str,
                         baseline: str | None = None) -> dict:
    """Time every model interleaved on the same batches -> ``metrics/comparison.json`` + MLflow.

    The first folder is the reference (the PyTorch fp32 teacher). Each model gets speed and size
    ratios to it, and to ``baseline`` (the standard recipe, e.g. ``baseline-ort-int8``) when that
    model is among them: all from this one run.
    """
    prepared = load_prepared(paths.prepared)
    dirs = {name_of(d): Path(d) for d in model_dirs}
    comparison = compare_latency(dirs, latency_texts(prepared.splits), evaluate, seed=seed)
    latency, noise = comparison.latency, comparison.noise
    if noise["noisy"]:
        print(f"bertshrink: note: {noise_note(noise)}. The figures are kept, marked noisy in {paths.comparison}, "
              "MLflow and the report.", file=sys.stderr)
    sizes = {name: size_on_disk(d)["total_bytes"] for name, d in dirs.items()}
    reference = next(iter(dirs))
    references = [reference] + ([baseline] if baseline in dirs and baseline != reference else [])
    models = {name: {"latency": lat, "size_bytes": sizes[name],
                     **{k: v for ref in references for k, v in ratios(name, ref, latency, sizes).items()}}
              for name, lat in latency.items()}
    result = {"reference": reference, "baseline": baseline if baseline in dirs else None,
              "iterations": evaluate.timed_iterations, "models": models,
              "method": "interleaved: each seeded batch is run by every model back to back, in rotating order; "
                        "the timed batches are replayed in rounds (noise.batches.*.attempts[-1].rounds)",
              "machine": machine_info(evaluate.threads), "data_content_hash": prepared.content_hash, "noise": noise}
    out = paths.comparison
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))  # insertion order: the reference first
    for name, entry in models.items():
        log_metrics(run_id, {f"{name}.{k}": v for k, v in flat_metrics(entry).items()})
    log_noise(run_id, noise)
    log_artifact(run_id, out)
    return result
