"""Prefect task for the teacher stage: fine-tune, then log params, curves and metadata."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.data import load_prepared
from bertshrink.params import BaseParams, TeacherParams
from bertshrink.training import fine_tune
from tasks.tracking import log_artifact, log_history, log_metrics, log_params, set_tags


# No retries: a failed training run is not transient, and it resumes from its checkpoint anyway.
@task(name="train-teacher", cache_policy=NO_CACHE)
def train_teacher(teacher: TeacherParams, base: BaseParams, run_id: str) -> dict:
    """Fine-tune the teacher into ``models/teacher``; returns its folder and metrics."""
    prepared = load_prepared(base.prepared_dir)
    result = fine_tune(
        prepared,
        teacher,
        output_dir=base.teacher_dir,
        work_dir=base.checkpoints_dir / "teacher",
        seed=base.seed,
        extra_meta={"training_run_id": run_id},
    )
    log_params(run_id, {f"teacher.{k}": v for k, v in teacher.model_dump(mode="json").items()})
    log_history(run_id, result.history)
    log_metrics(run_id, result.metrics)
    set_tags(run_id, {"data.content_hash": prepared.content_hash, "device": result.device,
                      "resumed_from": result.resumed_from or "none"})
    log_artifact(run_id, result.model_dir / "bertshrink.json")
    return {"model_dir": str(result.model_dir), "metrics": result.metrics, "run_id": run_id}
