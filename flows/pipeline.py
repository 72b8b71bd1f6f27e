"""The whole pipeline: prepare -> validate -> teacher -> evaluate -> register -> floor -> compress ->
evaluate and register each candidate -> [search, with search.enabled] -> compare latencies -> promote -> report
(``python -m flows.pipeline``; ``make run``).

One MLflow parent run per execution, with a nested run per stage and per recipe. The same stage
flows are what ``dvc repro`` runs one by one. The teacher and the candidates are measured in this
one process, and timed once more side by side (interleaved), so their latency ratios compare. A recipe that fails (in compression, evaluation or
registration) does not stop the others; the run ends with an error naming it. ``dvc commit`` then
records what succeeded in ``dvc.lock``, so that a following ``dvc repro`` knows it is done.

On a Prefect server whose work pool has the ``recipe`` deployment, the recipes run there instead, as
flow runs of their own (``flows/fan_out.py``, the ``scale_out`` section); the rest stays here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import DEFAULT_PARAMS_FILE, Params, load_params
from bertshrink.config.recipes import check_against_config
from bertshrink.modelfolder.load import require_classification_head, source_config
from flows._cli import add_debug_option, run_cli
from flows.compare import compare_flow
from flows.compress import compress_flow, recipes_failed, recipes_that_cannot_apply
from flows.evaluate import evaluate_flow
from flows.evaluate_candidate import evaluate_candidate_flow
from flows.fan_out import fan_out_recipes, recipe_deployment
from flows.floor import floor_flow
from flows.prepare import prepare_flow
from flows.promote import promote_flow
from flows.register import evaluate_and_register, register_flow
from flows.report import report_flow
from flows.search import search_deployment, search_flow
from flows.teacher import teacher_flow
from flows.validate import validate_flow
from tracking.runs import git_commit, log_artifact, log_metrics, pipeline_run, set_tags


def summary_markdown(report: str, registered: list[dict], seconds: float, failed: dict[str, str] | None = None) -> str:
    """The report, then where each model was registered and what failed, then the wall time."""
    lines = [report, "## Registered", ""]
    for record in registered:
        if record.get("registered") is False:
            lines.append(f"- **not registered** `{record['alias']}` (kept for inspection): {record.get('reason')}")
        else:
            lines.append(f"- registered `{record['name']}` version {record['version']} as `@{record['alias']}` "
                         f"({record.get('flavor', 'transformers')} flavour)")
    for name, why in (failed or {}).items():
        lines.append(f"- **failed** `{name}`: {why}")
    lines += ["", f"Pipeline wall time: {seconds / 60:.1f} min."]
    return "\n".join(lines)


TEACHER_STAGES = ("prepare", "validate", "teacher", "evaluate", "register")
FLOOR_STAGES = ("floor", "evaluate-floor")
FINAL_STAGES = ("compare", "promote", "report")
CANDIDATE_STAGES = ("compress", "evaluate-candidate", "register-candidate")


def dvc_stages(recipes: list[str], floor: bool = True, search: bool = False) -> list[str]:
    """The dvc.yaml stages this run produced: the teacher's, the floor's, each finished recipe's, the
    search's, the final ones."""
    return [*TEACHER_STAGES, *(FLOOR_STAGES if floor else ()),
            *(f"{stage}@{name}" for name in recipes for stage in CANDIDATE_STAGES), *(("search",) if search else ()),
            *FINAL_STAGES]


def record_in_dvc(stages: list[str]) -> None:
    """``dvc commit`` the given stages so dvc.lock matches what this run produced; skipped outside DVC.

    Only stages that succeeded: a failed recipe has no outputs to commit and stays "changed" for
    ``dvc repro``. Runs DVC through this interpreter (``python -m dvc``): ``make run`` calls
    .venv/bin/python without the venv on PATH.
    """
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        print("bertshrink: note: not a DVC repository here; dvc.lock not updated.", file=sys.stderr)
        return
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *stages],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"bertshrink: note: `dvc commit` failed, dvc.lock not updated:\n{done.stderr}", file=sys.stderr)
    else:
        print("bertshrink: results recorded in dvc.lock; `dvc repro` now reruns only what changes.")


def evaluate_and_register_candidates(params: Params, parent: str, compressed: dict) -> tuple[list, list, dict]:
    """Each candidate through the teacher's evaluate and register code; a failure skips only that one."""
    results, registered, failed = evaluate_and_register(
        params, parent, {c["recipe"]: c["model_dir"] for c in compressed["succeeded"]},
        lambda recipe, _: evaluate_candidate_flow(params, parent, [recipe]))
    return results, registered, {**compressed["failed"], **failed}


def run_recipes(params: Params, params_file: str, parent: str, deployment) -> tuple[list, list, dict]:
    """Every recipe, each candidate evaluated and registered: on the work pool of ``deployment``
    (``flows/fan_out.py``), or here, one after another, without one."""
    if deployment is not None:
        return fan_out_recipes(params, params_file, parent, deployment)
    compressed = compress_flow(params, parent, raise_on_failure=False)
    return evaluate_and_register_candidates(params, parent, compressed)


def run_search(params: Params, params_file: str, parent: str, failed: dict[str, str]) -> dict | None:
    """The optional search stage (``search.enabled``): its front's members join the comparison, the
    promotion and the report like recipes. A failed search is reported like a failed recipe."""
    try:
        searched = search_flow(params, parent, params_file=params_file)
    except Exception as err:  # the recipes' candidates still go on to compare, promote and report
        failed["search"] = f"{type(err).__name__}: {err}"
        return None
    failed.update(searched["failed"])
    return searched


@flow(name="pipeline")
def pipeline_flow(params_file: str = str(DEFAULT_PARAMS_FILE), dvc_commit: bool = True) -> dict:
    """Run every stage once; parameters are parsed (and rejected) before any work starts."""
    params: Params = load_params(params_file)
    started = time.time()
    deployment = recipe_deployment(params)  # before any work: a wrong scale-out setup fails now
    if params.search.enabled:
        search_deployment(params)            # the same for the search's trials (and their study's storage)
    with pipeline_run(params.registry) as parent:
        set_tags(parent, {"params_file": params_file, "git_commit": git_commit()})
        prepare_flow(params, parent)
        validate_flow(params, parent)
        teacher_flow(params, parent)
        results = evaluate_flow(params, parent)
        registered = register_flow(params, parent)
        if params.floor.enabled:
            results += evaluate_flow(params, parent, [floor_flow(params, parent)["model_dir"]])
        candidate_results, candidate_records, failed = run_recipes(params, params_file, parent, deployment)
        results, registered = results + candidate_results, registered + candidate_records
        searched = run_search(params, params_file, parent, failed) if params.search.enabled else None
        if searched:
            results, registered = results + searched["results"], registered + searched["registered"]
        if len(results) > 1:
            comparison = compare_flow(params, parent, [r["model_dir"] for r in results])
            # on the parent too, where a reader of the pipeline's run looks first
            set_tags(parent, {"comparison.noisy": str(comparison["noise"]["noisy"]).lower()})
        promotion = promote_flow(params, parent, failed)
        report = report_flow(params, parent)
        seconds = time.time() - started
        markdown = summary_markdown(report["markdown"], registered, seconds, failed)
        summary_file = Artifacts(params.base).pipeline_summary
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(markdown)
        log_artifact(parent, summary_file)
        log_metrics(parent, {"pipeline_seconds": seconds, "recipes_failed": len(failed)})
        set_tags(parent, {"recipes_failed": ", ".join(failed) or "none"})
        create_markdown_artifact(key="bertshrink-summary", markdown=markdown, description="Models, metrics, registry")
    if dvc_commit and Path(params_file).resolve() != Path(DEFAULT_PARAMS_FILE).resolve():
        print(f"bertshrink: note: dvc.yaml runs {DEFAULT_PARAMS_FILE}, not {params_file}; dvc.lock not updated.",
              file=sys.stderr)
    elif dvc_commit:
        record_in_dvc(dvc_stages([r["alias"] for r in candidate_records], params.floor.enabled, bool(searched)))
    print(markdown)
    if failed:
        raise recipes_failed(failed, len(params.compress.recipes))
    return {"parent_run_id": parent, "registered": registered, "results": results, "seconds": seconds,
            "promotion": promotion, "report_dir": report["report_dir"]}


def check_recipes_before_training(params: Params) -> None:
    """A teacher source that is missing, unreachable, not of a supported family, or (taken as it is)
    not a fine-tuned classifier, and recipes that cannot apply to its shape, fail now, before any
    data is prepared or any model trained.

    The shape comes from the source's config: a folder's own, or a Hub model's (a small download).
    """
    config = source_config(params.teacher.model)
    if not params.teacher.train:
        require_classification_head(config, params.teacher.model)
    if params.compress.recipes:
        problems = check_against_config(params.compress, config)
        if problems:
            raise recipes_that_cannot_apply(problems)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE))
    parser.add_argument("--no-dvc-commit", action="store_true", help="do not record results in dvc.lock")
    add_debug_option(parser)
    args = parser.parse_args(argv)

    def check_then_run(params: Params) -> None:
        check_recipes_before_training(params)  # before Prefect or MLflow start
        pipeline_flow(params_file=args.params, dvc_commit=not args.no_dvc_commit)

    run_cli(check_then_run, args.params, args.debug)


if __name__ == "__main__":
    main()
