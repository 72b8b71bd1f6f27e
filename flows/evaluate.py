"""Stage flow: measure model folders (the teacher by default) (``python -m flows.evaluate``)."""

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from flows._cli import model_dir_option, run_stage
from tasks.evaluate import evaluate_model_task
from tracking.runs import stage_run


@flow(name="evaluate")
def evaluate_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> list[dict]:
    """One nested MLflow run per model folder, so teacher and candidates compare side by side."""
    paths, results = Artifacts(params.base), []
    for model_dir in model_dirs or [str(paths.teacher)]:
        with stage_run("evaluate", params.registry, parent_run_id) as run_id:
            results.append(evaluate_model_task(model_dir, params.evaluate, paths, params.base.seed, run_id))
    return results


if __name__ == "__main__":
    run_stage(evaluate_flow, __doc__, extra=model_dir_option("evaluate"), cli_args=("model_dirs",))
