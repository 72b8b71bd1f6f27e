"""Stage flow: the automatic recipe search (``python -m flows.search``).

A multi-objective Optuna study (validation accuracy up, batch-1 p50 and size down) under the
``registry:`` rule's constraints, within ``search.budget_minutes``. Proxy trials (short distillation
on a subset) first; the best 1/eta get the full budget; the full study's Pareto front (or, when no
trial met the constraints, the least-violating trials, flagged) becomes candidates
``models/candidates/search-<k>``, evaluated and registered like recipes (alias ``search-<k>``).
Writes ``reports/search/front.json``. A rerun resumes the study: finished trials are not repeated.

On a Prefect server where ``scale_out.search_deployment`` sits on a work pool, each trial is a flow
run of its own there (``flows/search_trial.py``): asked here, told by its worker to the shared study
(``search.storage`` on PostgreSQL), at most ``scale_out.concurrency`` at once. Without one, the trials
run here, one after another.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prefect import flow
from prefect.client.schemas.responses import DeploymentResponse

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from bertshrink.config.recipes import SEARCH_PREFIX
from bertshrink.data.prepare import load_prepared
from bertshrink.errors import CompressionError, MissingArtifactError, ScaleOutError
from bertshrink.modelfolder.families import family_of
from bertshrink.modelfolder.files import CONFIG_FILE
from bertshrink.modelfolder.size import content_fingerprint
from bertshrink.config.knobs import PromotionConstraints
from bertshrink.search.front import Front, promote_for_full, select_front
from bertshrink.search.scoring import Reference, materialize, teacher_reference, without_test
from bertshrink.search.space import SpaceContext, recipe_steps, recipe_yaml, suggest
from bertshrink.search.study import (FULL, MODEL_FINGERPRINT, PROXY, PROXY_TRIAL, SCORES, Budget, SearchStudy,
                                     TrialSpec, more_full_trials, more_proxy_trials, printable_storage,
                                     require_server_storage, study_key)
from flows._cli import parse_args, run_cli
from flows.evaluate import evaluate_flow
from flows.fan_out import Submitted, pool_deployment, run_on_pool, submit, teacher_version_of
from flows.register import evaluate_and_register
from tasks.search import PASTE_PREFIX, search_trial
from tracking.runs import log_artifact, log_metrics, log_params, set_tags, stage_run
from tracking.transfer import fetch_model_folder, log_model_folder


def space_context(params: Params, paths: Artifacts, prepared) -> SpaceContext:
    """The teacher's shape and family, and whether there is a transfer set to distil on."""
    config_file = paths.teacher / CONFIG_FILE
    if not config_file.is_file():
        raise MissingArtifactError(f"{config_file} not found: train the teacher first "
                                   "(`python -m flows.teacher` or `dvc repro teacher`).")
    config = json.loads(config_file.read_text())
    family = family_of(config)
    return SpaceContext(family.shape(config), prepared.transfer is not None and len(prepared.transfer) > 0, family)


@dataclass(frozen=True)
class SearchJob:
    """What every trial of one search run needs."""

    params: Params
    paths: Artifacts
    ctx: SpaceContext
    constraints: PromotionConstraints
    reference: Reference
    study: SearchStudy
    budget: Budget
    run_id: str          # the search stage's MLflow run: each trial's run is nested under it
    key: str = ""        # what the scores depend on (``study_key``), the studies' name suffix
    upload_models: bool = False   # on a worker: a full trial's model goes to its MLflow run


@dataclass(frozen=True)
class TrialPool:
    """Where the trials run when they fan out: the deployment, and what each flow run is given."""

    deployment: DeploymentResponse
    params_file: str
    teacher_version: str


def score_trial(job: SearchJob, spec: TrialSpec) -> str | None:
    """One trial as a Prefect task in a nested MLflow run; its scores (or its failure) go to the study.
    Returns why it failed, or None."""
    proxy = spec.user_attrs.get(PROXY_TRIAL)
    proxy_scores = None if proxy is None else job.study.trial(PROXY, proxy).user_attrs.get(SCORES)
    attrs: dict[str, Any] = {}
    try:
        with stage_run(f"search:{spec.stage}-{spec.number}", job.params.registry, job.run_id) as trial_run:
            scores = search_trial(spec, job.ctx, job.params.search, job.constraints, job.params.evaluate,
                                  job.reference, job.paths, job.params.base.seed, trial_run, proxy_scores)
            if job.upload_models and spec.stage == FULL:  # the submitter fetches the front's models from here
                attrs[MODEL_FINGERPRINT] = log_model_folder(trial_run, job.paths.search_trial(spec.study, spec.number))
    except Exception as err:  # one failing trial must not stop the search
        job.study.fail(spec, f"{type(err).__name__}: {err}")
        return f"{type(err).__name__}: {err}"
    job.study.tell(spec, {k: v for k, v in scores.items() if k != "constraints"}, mlflow_run_id=trial_run, **attrs)
    return None


def reuse_duplicate(job: SearchJob, spec: TrialSpec) -> bool:
    """The sampler proposed proxy params already scored: tell their scores again, train nothing."""
    same = job.study.duplicate_of(PROXY, spec.values) if spec.stage == PROXY else None
    if same is None:
        return False
    job.study.tell(spec, same.user_attrs[SCORES], duplicate_of=same.number)
    return True


def run_trial(job: SearchJob, spec: TrialSpec, failures: dict[str, str]) -> None:
    """One trial in this process."""
    if reuse_duplicate(job, spec):
        return
    failure = score_trial(job, spec)
    if failure:
        failures[f"{spec.study} #{spec.number}"] = failure


def ask(job: SearchJob, stage: str) -> TrialSpec:
    return job.study.ask(stage, lambda trial: suggest(trial, job.params.search.space, job.ctx))


def run_stage_here(job: SearchJob, stage: str, more: Callable[[int], bool], failures: dict[str, str]) -> None:
    """Trials of ``stage`` one after another while ``more(0)`` says so."""
    while more(0):
        run_trial(job, ask(job, stage), failures)


def run_stage_on_pool(job: SearchJob, pool: TrialPool, stage: str, more: Callable[[int], bool],
                      failures: dict[str, str]) -> None:
    """Trials of ``stage`` as flow runs on the pool, at most ``scale_out.concurrency`` at once, while
    ``more(in flight)`` says so. A flow run that does not complete is named; its trial, if its worker
    could not tell the study, is marked failed there."""
    asked: dict[str, TrialSpec] = {}

    def submit_next(in_flight: int) -> Submitted | None:
        while more(in_flight):
            spec = ask(job, stage)
            if reuse_duplicate(job, spec):
                continue
            key = f"{spec.study} #{spec.number}"
            asked[key] = spec
            return submit(pool.deployment, key, f"search trial {key}", f"search-{spec.stage}-{spec.number}", {
                "params_file": pool.params_file, "stage": spec.stage, "study": spec.study, "number": spec.number,
                "teacher_version": pool.teacher_version, "parent_run_id": job.run_id}, [f"search:{spec.stage}"])
        return None

    def ended(run: Submitted, why: str | None) -> None:
        spec = asked.pop(run.key)
        unfinished = job.study.unfinished(spec)   # its worker died before telling the study
        if why is None and not unfinished:
            return
        failures[run.key] = why or f"{run.named()} completed without telling the study"
        if unfinished:
            job.study.fail(spec, failures[run.key])

    run_on_pool(job.params.scale_out, submit_next, ended)


def run_proxy_stage(job: SearchJob, pool: TrialPool | None, failures: dict[str, str]) -> None:
    """Proxy trials until ``max_trials`` (all runs of the study together) or the proxy's share of
    the budget is spent; at least one trial finishes."""
    more = partial(more_proxy_trials, job.study, job.params.search, job.budget)
    if pool is None:
        run_stage_here(job, PROXY, more, failures)
    else:
        run_stage_on_pool(job, pool, PROXY, more, failures)


def run_full_stage(job: SearchJob, pool: TrialPool | None, failures: dict[str, str]) -> list[int]:
    """The proxy winners (top 1/eta by non-dominated rank) with the full budget, while the budget
    lasts; one full trial at least, whatever the clock says."""
    search = job.params.search
    winners = [s.number for s in promote_for_full(job.study.scored(PROXY), search.eta, search.max_full_trials)]
    job.study.enqueue_full(winners)
    more = partial(more_full_trials, job.study, job.budget)
    if pool is None:
        run_stage_here(job, FULL, more, failures)
    else:
        run_stage_on_pool(job, pool, FULL, more, failures)
    return winners


def fetch_front_models(job: SearchJob, front: Front) -> None:
    """Front members trained on workers: their models come from their trials' MLflow runs."""
    for member in front.members:
        attrs = job.study.trial(FULL, member.number).user_attrs
        if MODEL_FINGERPRINT in attrs:
            fetch_model_folder(attrs["mlflow_run_id"], job.paths.search_trial(job.study.names[FULL], member.number),
                               attrs[MODEL_FINGERPRINT])


def member_record(job: SearchJob, name: str, number: int, front: Front) -> dict[str, Any]:
    """A front member: its trials, recipe (pasteable YAML too), proxy and full scores, constraints."""
    full = job.study.trial(FULL, number)
    proxy_number = full.user_attrs.get(PROXY_TRIAL)
    proxy = None if proxy_number is None else job.study.trial(PROXY, proxy_number)
    steps = recipe_steps(full.params, job.ctx)
    scores = full.user_attrs.get(SCORES) or {}
    margins = next(m.constraints for m in front.members if m.number == number)
    return {"name": name, "model_dir": str(job.paths.candidate(name)), "full_trial": number,
            "proxy_trial": proxy_number, "params": dict(full.params), "recipe": steps,
            "recipe_yaml": recipe_yaml(f"{PASTE_PREFIX}{number}", steps),
            "proxy": None if proxy is None else proxy.user_attrs.get(SCORES), "full": scores,
            "constraints": margins, "constraints_met": all(v <= 0 for v in margins.values())}


def materialize_front(job: SearchJob, front: Front) -> list[dict]:
    """Each member's model as ``models/candidates/search-<k>``; members of an older, larger front go."""
    members = []
    for k, member in enumerate(front.members, start=1):
        name = f"{SEARCH_PREFIX}{k}"
        record = member_record(job, name, member.number, front)
        materialize(job.paths.search_trial(job.study.names[FULL], member.number), job.paths.candidate(name), name,
                    {"study": job.study.names[FULL], "trial": member.number, "proxy_trial": record["proxy_trial"],
                     "constraints_met": front.constraints_met, "proxy": record["proxy"], "full": record["full"]})
        members.append(record)
    for old in job.paths.candidate(SEARCH_PREFIX).parent.glob(f"{SEARCH_PREFIX}*"):
        if old.is_dir() and old.name not in {m["name"] for m in members}:
            shutil.rmtree(old)
    return members


def write_front(job: SearchJob, front: Front, members: list[dict], winners: list[int],
                failures: dict[str, str], recovered: list[str]) -> dict:
    record = {"constraints_met": front.constraints_met, "reason": front.reason,
              "constraints": job.constraints.model_dump(), "objectives": ["validation accuracy (max)",
                                                                          "batch-1 p50 ms (min)", "size MB (min)"],
              "studies": dict(job.study.names), "storage": printable_storage(job.study.storage),
              "trials": {"proxy": len(job.study.trials(PROXY)), "full": len(job.study.trials(FULL))},
              "full_budget_for": winners, "failed": failures, "recovered": recovered,
              "minutes": round(job.budget.elapsed_minutes, 2), "budget_minutes": job.params.search.budget_minutes,
              "members": members}
    out = job.paths.search_front
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    return record


def evaluate_and_register_members(params: Params, parent_run_id: str, members: list[dict]) -> tuple[list, list, dict]:
    """Each member through the recipes' evaluate and register code (alias ``search-<k>``)."""
    return evaluate_and_register(params, parent_run_id, {m["name"]: m["model_dir"] for m in members},
                                 lambda _, model_dir: evaluate_flow(params, parent_run_id, [model_dir]))


def search_job(params: Params, paths: Artifacts, run_id: str, upload_models: bool = False) -> SearchJob:
    """The studies (created or resumed), the space's context, the teacher on validation, the clock."""
    prepared = load_prepared(paths.prepared)
    ctx = space_context(params, paths, prepared)
    constraints = params.registry.constraints()
    key = study_key(params.search, constraints, content_fingerprint(paths.teacher), prepared.content_hash,
                    params.base.seed)
    storage = paths.search_storage(params.search.storage)
    study = SearchStudy(storage, f"{params.search.study_name}-{key}", params.search.sampler, params.base.seed,
                        constraints)
    reference = teacher_reference(paths.teacher, without_test(prepared), params.evaluate)
    return SearchJob(params, paths, ctx, constraints, reference, study,
                     Budget(params.search.budget_minutes, params.search.full_share), run_id, key, upload_models)


def open_search(params: Params, paths: Artifacts, run_id: str) -> SearchJob:
    """The search's job, its settings logged on the search's run."""
    job = search_job(params, paths, run_id)
    log_params(run_id, {"search.storage": printable_storage(job.study.storage), "search.key": job.key,
                        "teacher.validation_accuracy": job.reference.accuracy,
                        **{f"search.{k}": v for k, v in params.search.model_dump(mode="json").items()}})
    set_tags(run_id, {"search.proxy_study": job.study.names[PROXY], "search.full_study": job.study.names[FULL]})
    return job


def search_deployment(params: Params) -> DeploymentResponse | None:
    """The deployment to submit trials to (``scale_out.search_deployment``), or None to run them here.
    Fanning out needs the study on a database server (``ScaleOutError`` before any work otherwise)."""
    deployment = pool_deployment(params, params.scale_out.search_deployment, "search trials")
    if deployment is not None:
        require_server_storage(params.search.storage)
    return deployment


def trial_pool(params: Params, params_file: str | None) -> TrialPool | None:
    """Where this search's trials run: a work pool, or None for this process."""
    deployment = search_deployment(params)
    if deployment is None:
        return None
    if not params_file:
        raise ScaleOutError("search trials fan out to workers that read the params file: pass params_file to "
                            "search_flow (`python -m flows.search --params <file>` does).")
    return TrialPool(deployment, params_file, teacher_version_of(params))


@flow(name="search")
def search_flow(params: Params, parent_run_id: str | None = None, params_file: str | None = None) -> dict:
    """Run (or resume) the search, register its front; returns the front and the members' results.
    ``params_file`` (where ``params`` came from) is what trials on a work pool read."""
    paths = Artifacts(params.base)
    paths.require_writable(paths.search_dir, paths.search_reports, paths.candidate(SEARCH_PREFIX).parent)
    pool = trial_pool(params, params_file)   # before any work: a wrong scale-out setup fails now
    failures: dict[str, str] = {}
    with stage_run("search", params.registry, parent_run_id) as run_id:
        job = open_search(params, paths, run_id)
        recovered = job.study.recover()
        if recovered:
            print(f"bertshrink: resuming the search; trials a killed run left unfinished run again: "
                  f"{', '.join(recovered)}", file=sys.stderr)
        run_proxy_stage(job, pool, failures)
        winners = run_full_stage(job, pool, failures)
        front = select_front(job.study.scored(FULL), params.search.max_front_size)
        if not front.members:
            raise CompressionError("the search finished no full-budget trial, so it has no model: "
                                   + "; ".join(f"{k}: {v}" for k, v in failures.items()))
        fetch_front_models(job, front)
        members = materialize_front(job, front)
        record = write_front(job, front, members, winners, failures, recovered)
        log_metrics(run_id, {"search.minutes": job.budget.elapsed_minutes, "search.proxy_trials": record["trials"]["proxy"],
                             "search.full_trials": record["trials"]["full"], "search.front_size": len(members)})
        set_tags(run_id, {"search.constraints_met": str(front.constraints_met).lower(), "search.reason": front.reason})
        results, registered, failed = evaluate_and_register_members(params, parent_run_id or run_id, members)
        versions = {r["alias"]: r.get("version") for r in registered}
        for member in record["members"]:
            member["registered_version"] = versions.get(member["name"])
        paths.search_front.write_text(json.dumps(record, indent=2, default=str))
        log_artifact(run_id, paths.search_front)
    print(f"bertshrink: search front ({front.reason}): "
          + ", ".join(f"{m['name']} (trial {m['full_trial']}, validation accuracy {m['full']['accuracy']:.4f}, "
                      f"{m['full']['p50_ms']:.2f} ms, {m['full']['size_mb']:.1f} MB)" for m in members))
    return {"front": record, "results": results, "registered": registered, "failed": failed}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    run_cli(lambda params: search_flow(params, args.parent_run_id, params_file=args.params), args.params, args.debug)


if __name__ == "__main__":
    main()
