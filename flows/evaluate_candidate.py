"""Stage flow: measure a recipe's candidate like the teacher, and with ``evaluate.seeds > 1`` rebuild
the recipe with more seeds for the spread of its scores
(``python -m flows.evaluate_candidate --recipe NAME``)."""

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from flows._cli import recipe_option, run_stage, selected_recipes
from flows.evaluate import evaluate_flow
from tasks.repeats import seed_spread_task


@flow(name="evaluate-candidate")
def evaluate_candidate_flow(params: Params, parent_run_id: str | None = None,
                            recipes: list[str] | None = None) -> list[dict]:
    """The same evaluation as the teacher's for each named recipe's candidate (default: all)."""
    paths, results = Artifacts(params.base), []
    for name in selected_recipes(params, recipes):
        results += evaluate_flow(params, parent_run_id, [str(paths.candidate(name))])
        if params.evaluate.seeds > 1:
            seed_spread_task(name, params.compress.recipes[name], params.evaluate, paths, params.base.seed)
    return results


if __name__ == "__main__":
    run_stage(evaluate_candidate_flow, __doc__, extra=recipe_option("evaluate"), cli_args=("recipes",))
