"""Stage flow: fine-tune the teacher into models/teacher (``python -m flows.teacher``)."""

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from flows._cli import run_stage
from tasks.teacher import train_teacher_task
from tracking.runs import stage_run


@flow(name="teacher")
def teacher_flow(params: Params, parent_run_id: str | None = None) -> dict:
    with stage_run("teacher", params.registry, parent_run_id) as run_id:
        return train_teacher_task(params.teacher, Artifacts(params.base), params.base.seed, run_id,
                                  params.distributed)


if __name__ == "__main__":
    run_stage(teacher_flow, __doc__)
