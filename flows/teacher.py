"""Stage flow: fine-tune the teacher into models/teacher (``python -m flows.teacher``)."""

from prefect import flow

from bertshrink.params import Params
from flows._cli import run_stage
from tasks.teacher import train_teacher
from tasks.tracking import stage_run


@flow(name="teacher")
def teacher_flow(params: Params, parent_run_id: str | None = None) -> dict:
    with stage_run("teacher", params.registry, parent_run_id) as run_id:
        return train_teacher(params.teacher, params.base, run_id)


if __name__ == "__main__":
    run_stage(teacher_flow, __doc__)
