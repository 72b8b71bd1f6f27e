"""Prefect task for the compress stage: run one recipe on the teacher and track it in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.compress import run_recipe
from bertshrink.data import load_prepared
from bertshrink.modeling import read_model_meta
from bertshrink.params import BaseParams
from bertshrink.recipes import Recipe
from tasks.tracking import log_artifact, log_metrics, log_params, set_tags


def candidate_dir(base: BaseParams, recipe_name: str) -> Path:
    return Path(base.models_dir) / "candidates" / recipe_name


def teacher_model_version(base: BaseParams) -> str:
    """The registered teacher version, from the register stage's record (if it ran)."""
    record = Path(base.reports_dir) / "registry" / "teacher.json"
    return json.loads(record.read_text()).get("version", "unknown") if record.is_file() else "unregistered"


# No retries: a recipe that failed once fails again; the flow reports it and goes on.
@task(name="compress-recipe", cache_policy=NO_CACHE)
def compress_recipe(name: str, recipe: Recipe, base: BaseParams, run_id: str) -> dict:
    """Apply ``recipe`` to the teacher into ``models/candidates/<name>``; log steps to MLflow."""
    prepared = load_prepared(base.prepared_dir)
    teacher = read_model_meta(base.teacher_dir)
    out = candidate_dir(base, name)
    teacher_version = teacher_model_version(base)
    records = run_recipe(name, recipe, base.teacher_dir, prepared, out, Path(base.checkpoints_dir) / "compress" / name,
                         base.seed, int(teacher.get("max_length", 128)),
                         extra_meta={"compress_run_id": run_id, "teacher_model_version": teacher_version})
    log_params(run_id, {"recipe": name, **{f"step{r.index}.{r.kind}.{k}": v for r in records for k, v in r.params.items()}})
    for r in records:
        log_metrics(run_id, {f"step{r.index}.parameters_before": r.parameters_before,
                             f"step{r.index}.parameters_after": r.parameters_after, f"step{r.index}.seconds": r.seconds})
    log_step_reports(run_id, name, records, base)
    set_tags(run_id, {"recipe": name, "steps": " -> ".join(r.kind for r in records),
                      "parent_teacher_run_id": teacher.get("training_run_id", "unknown"),
                      "teacher_model_version": teacher_version,
                      "data.content_hash": prepared.content_hash})
    return {"recipe": name, "model_dir": str(out), "parameters": records[-1].parameters_after, "run_id": run_id}


def log_step_reports(run_id: str, name: str, records, base: BaseParams) -> None:
    """Export parity and fusions, quantization and calibration provenance: as MLflow params/metrics + a JSON artifact."""
    for r in records:
        details = r.details or {}
        parity = details.get("parity") or {}
        log_metrics(run_id, {f"step{r.index}.parity.{k}": v for k, v in parity.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if "fusions" in details:
            set_tags(run_id, {f"step{r.index}.fusions": json.dumps(details["fusions"], sort_keys=True)})
        calibration = details.get("calibration")
        if calibration:
            log_params(run_id, {f"calibration.{k}": calibration.get(k) for k in ("split", "rows", "seed", "sha256", "method")})
    reports = {f"step{r.index}.{r.kind}": r.details for r in records if r.details}
    out = Path(base.reports_dir) / "compress" / f"{name}.steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(reports, indent=2, sort_keys=True, default=str))  # row ids of the calibration set too
    log_artifact(run_id, out)
