"""One recipe on a worker (``prefect.yaml``'s ``recipe`` deployment; ``python -m flows.recipe``).

The pipeline submits one flow run of this per recipe when it runs against a Prefect server where
the deployment sits on a work pool (``flows/fan_out.py``). A worker on a fresh checkout needs no
shared disk: the teacher and the prepared data come from the teacher version's artifacts on the
MLflow tracking server; the candidate goes back there, registered like any other.
"""

from __future__ import annotations

import argparse

from prefect import flow

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.params import DEFAULT_PARAMS_FILE, Params, load_params
from bertshrink.config.recipes import recipe_fingerprint
from bertshrink.errors import CompressionError, ParamsError
from flows._cli import add_debug_option, run_cli, selected_recipes
from flows.compress import compress_flow, recipes_failed
from flows.pipeline import evaluate_and_register_candidates
from tasks.transfer import fetch_teacher_task
from tracking.runs import require_shared_tracking


def check_same_recipe(params: Params, recipe: str, expected: str | None) -> None:
    """The worker's params file must hold the recipe the submitter meant (same steps and knobs)."""
    selected_recipes(params, [recipe])
    if expected and recipe_fingerprint(params.compress.recipes[recipe]) != expected:
        raise ParamsError(f"recipe '{recipe}' in this worker's params file differs from the one the pipeline "
                          "submitted: commit the params file and update the worker's checkout (git pull).")


@flow(name="recipe")
def recipe_flow(params_file: str = str(DEFAULT_PARAMS_FILE), recipe: str = "", teacher_version: str = "",
                recipe_fingerprint: str | None = None, parent_run_id: str | None = None) -> dict:
    """Fetch the teacher version, run ``recipe`` on it, evaluate and register the candidate; returns
    its registration record (``registered: false`` for a collapsed one)."""
    params = load_params(params_file)
    check_same_recipe(params, recipe, recipe_fingerprint)
    require_shared_tracking("a recipe's flow run on a worker")
    if not teacher_version:
        raise ParamsError("teacher_version is empty: the pipeline passes the registered teacher's version "
                          f"(see {Artifacts(params.base).registry_record(TEACHER)} on the submitting machine).")
    fetch_teacher_task(params, teacher_version)
    compressed = compress_flow(params, parent_run_id, [recipe], raise_on_failure=False)
    _, registered, failed = evaluate_and_register_candidates(params, parent_run_id, compressed)
    if failed:
        raise recipes_failed(failed, 1)
    if not registered:
        raise CompressionError(f"recipe '{recipe}' produced no candidate.")
    return registered[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--teacher-version", required=True)
    parser.add_argument("--parent-run-id", default=None)
    add_debug_option(parser)
    args = parser.parse_args(argv)
    run_cli(lambda _: recipe_flow(args.params, args.recipe, args.teacher_version, parent_run_id=args.parent_run_id),
            args.params, args.debug)


if __name__ == "__main__":
    main()
