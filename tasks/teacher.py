"""Prefect task for the teacher stage: fine-tune, then log params, curves and metadata."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.knobs import DistributedKnobs
from bertshrink.config.params import TeacherParams
from bertshrink.data.prepare import load_prepared
from bertshrink.modelfolder.meta import meta_path
from bertshrink.training.finetune import train_teacher
from tracking.runs import log_artifact, log_history, log_metrics, log_params, set_tags


# No retries: a failed training run is not transient, and it resumes from its checkpoint anyway.
@task(name="train-teacher", cache_policy=NO_CACHE)
def train_teacher_task(teacher: TeacherParams, paths: Artifacts, seed: int, run_id: str,
                       distributed: DistributedKnobs | None = None) -> dict:
    """Fine-tune the teacher into ``models/teacher``; returns its folder and metrics. With
    ``distributed.processes`` > 1 it trains under torchrun (DDP); this process logs to MLflow."""
    paths.require_writable(paths.teacher.parent, paths.checkpoints(TEACHER))
    prepared = load_prepared(paths.prepared)
    result = train_teacher(prepared, teacher, paths.teacher, paths.checkpoints(TEACHER), seed,
                           extra_meta={"training_run_id": run_id}, distributed=distributed)
    log_params(run_id, {f"teacher.{k}": v for k, v in teacher.model_dump(mode="json").items()})
    log_history(run_id, result.history)
    log_metrics(run_id, result.metrics)
    set_tags(run_id, {"data.content_hash": prepared.content_hash, "device": result.device,
                      "resumed_from": result.resumed_from or "none",
                      "world_size": str(result.distributed.get("world_size", 1))})
    log_artifact(run_id, meta_path(result.model_dir))
    return {"model_dir": str(result.model_dir), "metrics": result.metrics, "run_id": run_id}
