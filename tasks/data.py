"""Prefect tasks for the data stages: prepare and validate."""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import DataParams, ValidateParams
from bertshrink.data.prepare import load_prepared, prepare_splits, write_prepared
from bertshrink.data.sources import load_raw_dataset
from bertshrink.data.validation import assert_valid, run_validation
from bertshrink.errors import retry_only_transient
from tracking.runs import log_artifact, log_metrics, log_params, set_tags


# A Hub download can fail transiently; a missing file or column cannot, and is not retried.
@task(name="prepare-data", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_only_transient,
      cache_policy=NO_CACHE)
def prepare_data(data: DataParams, validate: ValidateParams, paths: Artifacts, seed: int, run_id: str) -> dict:
    """Load the source, split it, check the rows with the validation suite, and only then swap in
    the Parquet + meta.json (a bad source leaves the last good data/prepared); returns the meta."""
    paths.require_writable(paths.prepared.parent)
    raw = load_raw_dataset(data.source, data.text_column, data.label_column, data.split_names)
    prepared = prepare_splits(raw, data, seed)
    assert_valid(run_validation(prepared.splits, prepared.label_names, validate))
    out_dir = write_prepared(prepared, paths.prepared)
    log_params(run_id, {f"data.{k}": v for k, v in data.model_dump(mode="json").items()})
    log_metrics(run_id, {f"rows.{k}": v for k, v in prepared.meta["rows"].items()}
                | {f"dropped.{kind}.{split}": entry["count"] for kind, splits in prepared.meta["dropped"].items()
                   for split, entry in splits.items()})
    set_tags(run_id, {"data.content_hash": prepared.content_hash, "data.source": raw.source})
    log_artifact(run_id, out_dir / "meta.json")
    return prepared.meta


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(validate: ValidateParams, paths: Artifacts, run_id: str) -> dict:
    """Run the Great Expectations suite; write JSON + Data Docs; raise if it failed."""
    prepared = load_prepared(paths.prepared)
    out_dir = paths.validation_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run_validation(prepared.splits, prepared.label_names, validate, docs_dir=out_dir / "data_docs")
    result = {**report.to_dict(), "data_content_hash": prepared.content_hash}
    # The result file is a DVC dependency of `teacher`: keep run-to-run noise (timings) out of it.
    elapsed = result["statistics"].pop("elapsed_s", None)
    paths.validation_result.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    log_params(run_id, {f"validate.{k}": v for k, v in validate.model_dump(mode="json").items()})
    log_metrics(run_id, {"validation.success": float(report.success), "validation.failures": len(report.failures),
                          "validation.seconds": elapsed or 0.0})
    set_tags(run_id, {"data.content_hash": prepared.content_hash})
    log_artifact(run_id, out_dir, "validation")
    assert_valid(report)
    return result
