"""Prefect task for the compress stage: run one recipe on the teacher and track it in MLflow."""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.compression.recipe import run_recipe
from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.knobs import DistributedKnobs
from bertshrink.config.recipes import Recipe, recipe_fingerprint
from bertshrink.data.prepare import load_prepared
from bertshrink.modelfolder.meta import read_meta
from bertshrink.modelfolder.size import content_fingerprint
from tracking.runs import log_artifact, log_metrics, log_params, set_tags


def teacher_model_version(paths: Artifacts) -> str:
    """The registered teacher version, from the register stage's record (if it ran)."""
    record = paths.registry_record(TEACHER)
    return json.loads(record.read_text()).get("version", "unknown") if record.is_file() else "unregistered"


# No retries: a recipe that failed once fails again; the flow reports it and goes on.
@task(name="compress-recipe", cache_policy=NO_CACHE)
def compress_recipe(name: str, recipe: Recipe, paths: Artifacts, seed: int, run_id: str,
                    distributed: DistributedKnobs | None = None) -> dict:
    """Apply ``recipe`` to the teacher into ``models/candidates/<name>``; log steps to MLflow.
    ``distributed`` with more than one process runs its distill steps under torchrun (DDP)."""
    paths.require_writable(paths.candidate(name).parent, paths.checkpoints("compress", name),
                           paths.compress_steps(name).parent)
    prepared = load_prepared(paths.prepared)
    teacher = read_meta(paths.teacher)
    out = paths.candidate(name)
    teacher_version = teacher_model_version(paths)
    records = run_recipe(name, recipe, paths.teacher, prepared, out, paths.checkpoints("compress", name), seed,
                         int(teacher.max_length or 128),
                         extra_meta={"compress_run_id": run_id, "teacher_model_version": teacher_version,
                                     "teacher_model_fingerprint": content_fingerprint(paths.teacher),
                                     "recipe_fingerprint": recipe_fingerprint(recipe)},
                         logits_cache_dir=paths.checkpoints("teacher-logits"), distributed=distributed)
    log_params(run_id, {"recipe": name, **{f"step{r.index}.{r.kind}.{k}": v for r in records for k, v in r.params.items()}})
    for r in records:
        log_metrics(run_id, {f"step{r.index}.parameters_before": r.parameters_before,
                             f"step{r.index}.parameters_after": r.parameters_after, f"step{r.index}.seconds": r.seconds})
    log_step_reports(run_id, name, records, paths)
    set_tags(run_id, {"recipe": name, "steps": " -> ".join(r.kind for r in records),
                      "parent_teacher_run_id": teacher.training_run_id or "unknown",
                      "teacher_model_version": teacher_version,
                      "data.content_hash": prepared.content_hash})
    return {"recipe": name, "model_dir": str(out), "parameters": records[-1].parameters_after, "run_id": run_id}


def log_step_reports(run_id: str, name: str, records, paths: Artifacts) -> None:
    """Export parity and fusions, per-layer precisions, quantization and calibration provenance: as MLflow
    params/metrics/tags + a JSON artifact (which also has the sensitivity rows' ids)."""
    for r in records:
        details = r.details or {}
        parity = details.get("parity") or {}
        log_metrics(run_id, {f"step{r.index}.parity.{k}": v for k, v in parity.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if "fusions" in details:
            set_tags(run_id, {f"step{r.index}.fusions": json.dumps(details["fusions"], sort_keys=True)})
        mixed = details.get("mixed_precision")
        if mixed:
            log_metrics(run_id, {f"step{r.index}.average_bits": mixed["average_bits"]})
            set_tags(run_id, {f"step{r.index}.precisions": json.dumps(mixed["precisions"]),
                              f"step{r.index}.sensitivity": json.dumps(mixed.get("sensitivity"))})
        calibration = details.get("calibration")
        if calibration:
            log_params(run_id, {f"calibration.{k}": calibration.get(k) for k in ("split", "rows", "seed", "sha256", "method")})
    reports = {f"step{r.index}.{r.kind}": r.details for r in records if r.details}
    out = paths.compress_steps(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(reports, indent=2, sort_keys=True, default=str))  # row ids of the calibration set too
    log_artifact(run_id, out)
