"""Stage flow: log the teacher to MLflow's registry with the ``teacher`` alias
(``python -m flows.register``)."""

from pathlib import Path

from prefect import flow

from bertshrink.params import Params
from flows._cli import run_stage
from tasks.evaluate import metrics_path
from tasks.registry import register_model
from tasks.tracking import stage_run


def registration_record(params: Params, model_name: str) -> Path:
    return Path(params.base.reports_dir) / "registry" / f"{model_name}.json"


@flow(name="register")
def register_flow(params: Params, parent_run_id: str | None = None) -> dict:
    teacher_dir = params.base.teacher_dir
    with stage_run("register", params.registry, parent_run_id) as run_id:
        return register_model(
            str(teacher_dir),
            str(metrics_path(params.base, teacher_dir.name)),
            params.registry,
            params.registry.teacher_alias,
            run_id,
            str(registration_record(params, teacher_dir.name)),
        )


if __name__ == "__main__":
    run_stage(register_flow, __doc__)
