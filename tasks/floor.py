"""Prefect task for the floor stage: train the TF-IDF + logistic regression baseline, log it."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.data import load_prepared
from bertshrink.floor import FLOOR_NAME, save_floor, train_floor
from bertshrink.params import BaseParams, FloorParams
from tasks.tracking import log_artifact, log_metrics, log_params, set_tags


def floor_dir(base: BaseParams) -> Path:
    return Path(base.models_dir) / FLOOR_NAME


@task(name="train-floor", cache_policy=NO_CACHE)
def train_floor_task(floor: FloorParams, base: BaseParams, run_id: str) -> dict:
    """Fit the floor on the train split (C chosen on validation) into ``models/floor``."""
    prepared = load_prepared(base.prepared_dir)
    pipeline, search = train_floor(prepared, floor, base.seed)
    out = save_floor(pipeline, prepared, floor, search, floor_dir(base))
    log_params(run_id, {f"floor.{k}": v for k, v in floor.model_dump(mode="json").items()} | {"chosen_c": search["chosen_c"]})
    log_metrics(run_id, {f"validation_accuracy.C_{c}": v for c, v in search["validation_accuracy_by_c"].items()})
    set_tags(run_id, {"data.content_hash": prepared.content_hash})
    log_artifact(run_id, out / "bertshrink.json")
    return {"model_dir": str(out), **search}
