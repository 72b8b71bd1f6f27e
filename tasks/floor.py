"""Prefect task for the floor stage: train the TF-IDF + logistic regression baseline, log it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import FloorParams
from bertshrink.data.prepare import load_prepared
from bertshrink.evaluation.floor import save_floor, train_floor
from bertshrink.modelfolder.meta import meta_path
from tracking.runs import log_artifact, log_metrics, log_params, set_tags


@task(name="train-floor", cache_policy=NO_CACHE)
def train_floor_task(floor: FloorParams, paths: Artifacts, seed: int, run_id: str) -> dict:
    """Fit the floor on the train split (C chosen on validation) into ``models/floor``."""
    paths.require_writable(paths.floor.parent)
    prepared = load_prepared(paths.prepared)
    pipeline, search = train_floor(prepared, floor, seed)
    out = save_floor(pipeline, prepared, floor, search, paths.floor)
    log_params(run_id, {f"floor.{k}": v for k, v in floor.model_dump(mode="json").items()} | {"chosen_c": search["chosen_c"]})
    log_metrics(run_id, {f"validation_accuracy.C_{c}": v for c, v in search["validation_accuracy_by_c"].items()})
    set_tags(run_id, {"data.content_hash": prepared.content_hash})
    log_artifact(run_id, meta_path(out))
    return {"model_dir": str(out), **search}
