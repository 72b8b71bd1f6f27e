"""Prefect task for the evaluate stage: the same code measures the teacher and every candidate."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.data import load_prepared
from bertshrink.measure import (compare_latency, evaluate_model, flat_metrics, latency_texts, machine_info,
                                size_on_disk)
from bertshrink.params import BaseParams, EvaluateParams
from tasks.tracking import log_artifact, log_metrics, log_params, set_tags


def metrics_path(base: BaseParams, model_name: str) -> Path:
    return Path(base.metrics_dir) / f"{model_name}.json"


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model_task(model_dir: str, evaluate: EvaluateParams, base: BaseParams, run_id: str) -> dict:
    """Accuracy, size, latency and memory of one model folder -> ``metrics/<model>.json`` + MLflow."""
    prepared = load_prepared(base.prepared_dir)
    model_name = Path(model_dir).name
    result = evaluate_model(Path(model_dir), prepared.splits, evaluate, seed=base.seed)
    result.update({"model": model_name, "evaluation_run_id": run_id, "data_content_hash": prepared.content_hash})
    out = metrics_path(base, model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    log_params(run_id, {f"evaluate.{k}": v for k, v in evaluate.model_dump(mode="json").items()})
    log_metrics(run_id, flat_metrics(result))
    set_tags(run_id, {"model": model_name, "data.content_hash": prepared.content_hash,
                      **{f"machine.{k}": v for k, v in result.get("machine", {}).items()}})
    log_artifact(run_id, out)
    return result


def comparison_path(base: BaseParams) -> Path:
    return Path(base.metrics_dir) / "comparison.json"


@task(name="compare-latency", cache_policy=NO_CACHE)
def compare_latency_task(model_dirs: list[str], evaluate: EvaluateParams, base: BaseParams, run_id: str,
                         baseline: str | None = None) -> dict:
    """Time every model interleaved on the same batches -> ``metrics/comparison.json`` + MLflow.

    The first folder is the reference (the PyTorch fp32 teacher). Each model gets speed and size
    ratios to it, and to ``baseline`` (the standard recipe, e.g. ``baseline-ort-int8``) when that
    model is among them: all from this one run.
    """
    prepared = load_prepared(base.prepared_dir)
    dirs = {Path(d).name: Path(d) for d in model_dirs}
    latency = compare_latency(dirs, latency_texts(prepared.splits), evaluate, seed=base.seed)
    sizes = {name: size_on_disk(d)["total_bytes"] for name, d in dirs.items()}
    reference = next(iter(dirs))
    references = [reference] + ([baseline] if baseline in dirs and baseline != reference else [])
    models = {name: {"latency": lat, "size_bytes": sizes[name],
                     **{k: v for ref in references for k, v in ratios(name, ref, latency, sizes).items()}}
              for name, lat in latency.items()}
    result = {"reference": reference, "baseline": baseline if baseline in dirs else None,
              "iterations": evaluate.timed_iterations, "models": models,
              "method": "interleaved: each seeded batch is run by every model back to back, in rotating order",
              "machine": machine_info(evaluate.threads), "data_content_hash": prepared.content_hash}
    out = comparison_path(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))  # insertion order: the reference first
    for name, entry in models.items():
        log_metrics(run_id, {f"{name}.{k}": v for k, v in flat_metrics(entry).items()})
    log_artifact(run_id, out)
    return result


def ratios(name: str, reference: str, latency: dict, sizes: dict) -> dict:
    """``speedup_vs_<reference>`` per batch size and ``smaller_vs_<reference>`` (2.0 = twice as fast / small)."""
    return {f"speedup_vs_{reference}": speedups(latency[name], latency[reference]),
            f"smaller_vs_{reference}": sizes[reference] / sizes[name] if sizes[name] else None}


def speedups(latency: dict, reference: dict) -> dict:
    """Reference p50 / this model's p50 per batch size (2.0 = twice as fast)."""
    return {key: reference[key]["p50_ms"] / value["p50_ms"] for key, value in latency.items()
            if key in reference and value["p50_ms"] > 0}
