"""Stage flow: run compression recipes on the teacher (``python -m flows.compress [--recipe NAME]``).

Each recipe gets its own MLflow run and candidate folder ``models/candidates/<recipe>``. One recipe
failing does not stop the others; the flow reports which failed and why, and exits non-zero.
"""

from __future__ import annotations

import json

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from bertshrink.config.recipes import check_against_config
from bertshrink.errors import CompressionError, MissingArtifactError, ParamsError
from bertshrink.modelfolder.files import CONFIG_FILE
from flows._cli import recipe_option, run_stage, selected_recipes
from tasks.compress import compress_recipe
from tracking.runs import stage_run


def _teacher_config(params: Params) -> dict:
    config_file = Artifacts(params.base).teacher / CONFIG_FILE
    if not config_file.is_file():
        raise MissingArtifactError(f"{config_file} not found: train the teacher first "
                                   "(`python -m flows.teacher` or `dvc repro teacher`).")
    return json.loads(config_file.read_text())


def recipes_that_cannot_apply(problems: list[str]) -> ParamsError:
    return ParamsError("Recipes that cannot apply to this teacher:\n  - " + "\n  - ".join(problems))


@flow(name="compress")
def compress_flow(params: Params, parent_run_id: str | None = None, recipes: list[str] | None = None,
                  raise_on_failure: bool = True) -> dict:
    """Run the named recipes (default: all); returns the candidates made and the failures.

    With ``raise_on_failure`` (the CLI), any failed recipe ends in ``CompressionError`` after the
    others ran; the pipeline passes False, goes on with the successes and reports at the end.
    """
    names = selected_recipes(params, recipes)
    if names:
        problems = check_against_config(params.compress, _teacher_config(params))
        if problems:
            raise recipes_that_cannot_apply(problems)
    paths, succeeded, failed = Artifacts(params.base), [], {}
    for name in names:
        try:
            with stage_run(f"compress:{name}", params.registry, parent_run_id) as run_id:
                succeeded.append(compress_recipe(name, params.compress.recipes[name], paths, params.base.seed, run_id,
                                                 params.distributed))
        except Exception as err:  # one failing recipe must not stop the others
            failed[name] = f"{type(err).__name__}: {err}"
    summary = {"succeeded": succeeded, "failed": failed}
    out = paths.compress_summary
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    if failed and raise_on_failure:
        raise recipes_failed(failed, len(names))
    return summary


def recipes_failed(failed: dict[str, str], attempted: int) -> CompressionError:
    """One error naming every failed recipe and why."""
    lines = "\n".join(f"  - {name}: {why}" for name, why in failed.items())
    return CompressionError(f"{len(failed)} of {attempted} recipe(s) failed (the others were kept):\n{lines}")


if __name__ == "__main__":
    run_stage(compress_flow, __doc__, extra=recipe_option("run"), cli_args=("recipes",))
