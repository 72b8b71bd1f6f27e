"""Prefect task for the search stage: one trial (build a recipe's model, score it), tracked in MLflow.

A trial is plain data in and scores out, so trials can run on the workers of a work pool; the flow
asks the study for trials and tells it the scores (``flows.search``).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.knobs import PromotionConstraints
from bertshrink.config.params import EvaluateParams
from bertshrink.config.search import SearchParams
from bertshrink.data.prepare import load_prepared
from bertshrink.modelfolder.meta import read_meta
from bertshrink.search.front import constraint_margins
from bertshrink.search.scoring import Reference, TrialBuild, build_and_score, proxy_data, without_test
from bertshrink.search.space import SpaceContext, recipe_steps, recipe_yaml
from bertshrink.search.study import PROXY, TrialSpec
from tracking.runs import log_artifact, log_metrics, log_params, set_tags

PASTE_PREFIX = "searched-"   # the recipe name in the pasteable YAML (search-* names the front members)


@task(name="search-trial", cache_policy=NO_CACHE)
def search_trial(spec: TrialSpec, ctx: SpaceContext, search: SearchParams, constraints: PromotionConstraints,
                 evaluate: EvaluateParams, reference: Reference, paths: Artifacts, seed: int, run_id: str,
                 proxy_scores: dict | None = None) -> dict:
    """Build ``spec``'s model (proxy: short, on a subset, then deleted; full: kept) and score it on
    validation; logs its params, its recipe as pasteable YAML, its scores and its constraint status."""
    proxy = spec.stage == PROXY
    full_steps = recipe_steps(spec.values, ctx)
    steps = recipe_steps(spec.values, ctx, distill_epochs=search.proxy.epochs) if proxy else full_steps
    recipe_file = paths.search_recipe(spec.study, spec.number)
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(recipe_yaml(f"{PASTE_PREFIX}{spec.number}", full_steps))
    log_params(run_id, {"search.stage": spec.stage, "search.study": spec.study, "search.trial": spec.number,
                        **{f"trial.{k}": v for k, v in spec.values.items()},
                        **({"proxy.train_rows": search.proxy.train_rows, "proxy.epochs": search.proxy.epochs}
                           if proxy else {})})
    log_artifact(run_id, recipe_file)
    prepared = load_prepared(paths.prepared)
    data = proxy_data(prepared, search.proxy.train_rows, seed) if proxy else without_test(prepared)
    build = TrialBuild(paths.teacher, paths.search_trial(spec.study, spec.number),
                       paths.search_trial(spec.study, spec.number).with_name(f"work-{spec.number}"), seed,
                       int(read_meta(paths.teacher).max_length or 128), paths.checkpoints("teacher-logits"))
    scores = build_and_score(f"{PASTE_PREFIX}{spec.number}", steps, build, data, reference, evaluate,
                             search.latency_iterations, keep_model=not proxy)
    margins = constraint_margins(scores, constraints)
    met = all(v <= 0 for v in margins.values())
    log_metrics(run_id, {f"{spec.stage}.{k}": v for k, v in scores.items()})
    log_metrics(run_id, {f"proxy.{k}": v for k, v in (proxy_scores or {}).items()})
    log_metrics(run_id, {f"constraint.{k}": v for k, v in margins.items()})
    set_tags(run_id, {"search.stage": spec.stage, "search.constraints_met": str(met).lower(),
                      "search.steps": scores["steps"], **{f"search.{k}": v for k, v in spec.user_attrs.items()}})
    return {**scores, "constraints": margins, "constraints_met": met}
