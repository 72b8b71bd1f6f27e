"""Stage flow: log model folders to MLflow's registry (``python -m flows.register``).

The teacher gets the ``teacher`` alias (``registry.teacher_alias``); each candidate
``models/candidates/<recipe>`` gets its recipe's name as alias, so ``models:/<name>@<recipe>``
always points at the newest version of that recipe.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from bertshrink.params import Params
from flows._cli import model_dir_option, run_stage
from tasks.evaluate import metrics_path
from tasks.registry import register_model
from tasks.tracking import stage_run


def registration_record(params: Params, model_name: str) -> Path:
    return Path(params.base.reports_dir) / "registry" / f"{model_name}.json"


def alias_for(params: Params, model_dir: Path) -> str:
    """``teacher`` for the teacher, the recipe name for a candidate."""
    return params.registry.teacher_alias if Path(model_dir) == params.base.teacher_dir else Path(model_dir).name


@flow(name="register")
def register_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> list[dict]:
    """Register each model folder (default: the teacher); one nested MLflow run each."""
    records = []
    for model_dir in [Path(d) for d in model_dirs or [params.base.teacher_dir]]:
        with stage_run("register", params.registry, parent_run_id) as run_id:
            records.append(register_model(
                str(model_dir),
                str(metrics_path(params.base, model_dir.name)),
                params.registry,
                alias_for(params, model_dir),
                run_id,
                str(registration_record(params, model_dir.name)),
            ))
    return records


if __name__ == "__main__":
    run_stage(register_flow, __doc__, extra=model_dir_option("register"), cli_args=("model_dirs",))
