"""Stage flow: measure model folders (the teacher by default) (``python -m flows.evaluate``)."""

from pathlib import Path

from prefect import flow

from bertshrink.params import Params
from flows._cli import model_dir_option, run_stage
from tasks.evaluate import evaluate_model_task
from tasks.tracking import stage_run


@flow(name="evaluate")
def evaluate_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> list[dict]:
    """One nested MLflow run per model folder, so teacher and candidates compare side by side."""
    results = []
    for model_dir in model_dirs or [str(params.base.teacher_dir)]:
        with stage_run("evaluate", params.registry, parent_run_id) as run_id:
            results.append(evaluate_model_task(model_dir, params.evaluate, params.base, run_id,
                                               recipe_of(params, model_dir)))
    return results


def recipe_of(params: Params, model_dir: str):
    """The recipe that made a candidate folder (for repeats over seeds); None for the teacher and the floor."""
    if Path(model_dir) == params.base.teacher_dir:
        return None
    return params.compress.recipes.get(Path(model_dir).name)


if __name__ == "__main__":
    run_stage(evaluate_flow, __doc__, extra=model_dir_option("evaluate"), cli_args=("model_dirs",))
