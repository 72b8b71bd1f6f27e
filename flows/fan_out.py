"""Recipes fanned out as flow runs of the ``recipe`` deployment on a Prefect work pool.

When the pipeline runs against a Prefect server (``PREFECT_API_URL``) where ``scale_out.recipe_deployment``
exists on a work pool, it submits one flow run per recipe with ``run_deployment`` (at most
``scale_out.concurrency`` in flight), waits for them all, then fetches each registered candidate from
the tracking server and times, promotes and reports on this machine as in one process. Prefect's
workers do the scheduling; bertshrink only submits and waits.

A recipe already registered for this teacher (same content) as it is written now is not run again.
A flow run that fails, crashes or is cancelled is named; the others' results are kept.

The search's trials fan out through the same pieces (``pool_deployment``, ``submit``, ``run_on_pool``;
``flows/search.py``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import DeploymentResponse
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.params import Params
from bertshrink.config.recipes import recipe_fingerprint
from bertshrink.config.scale_out import ScaleOutParams
from bertshrink.errors import ScaleOutError
from bertshrink.modelfolder.size import content_fingerprint
from flows.zombies import note_missing_zombie_automation
from tasks.transfer import fetch_candidate_task
from tracking.runs import require_shared_tracking
from tracking.transfer import done_recipe_version


def pool_deployment(params: Params, name: str, what: str) -> DeploymentResponse | None:
    """Deployment ``name`` ("<flow>/<deployment>") to submit ``what`` to, or None to run it in this process.

    ``scale_out.mode``: ``local`` never fans out; ``auto`` fans out when a Prefect server has the
    deployment on a work pool; ``deployment`` insists, and says what is missing. Fanning out needs a
    shared MLflow tracking server (``ScaleOutError`` before any work otherwise).
    """
    scale, insist = params.scale_out, params.scale_out.mode == "deployment"
    if scale.mode == "local":
        return None
    if not PREFECT_API_URL.value():
        if insist:
            raise ScaleOutError(f"scale_out.mode is 'deployment', but PREFECT_API_URL is not set: point it at the "
                                f"Prefect server whose work pool runs the {what} (or set scale_out.mode: auto).")
        return None
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            if insist:
                raise ScaleOutError(f"the Prefect server at PREFECT_API_URL has no deployment '{name}': run "
                                    f"`prefect deploy --name {name.split('/', 1)[1]}` from the repository root, and "
                                    "start a worker on its pool.") from None
            return None
    if not deployment.work_pool_name:
        raise ScaleOutError(f"deployment '{name}' has no work pool: set `work_pool.name` in prefect.yaml and deploy "
                            "it again.")
    require_shared_tracking(f"running {what} on work pool '{deployment.work_pool_name}'")
    note_missing_zombie_automation(scale)
    return deployment


def recipe_deployment(params: Params) -> DeploymentResponse | None:
    """The deployment to submit recipes to (``scale_out.recipe_deployment``), or None to run them here."""
    return pool_deployment(params, params.scale_out.recipe_deployment, "recipes")


@dataclass
class Submitted:
    """A flow run in flight: what it runs (a recipe's name, a trial's), its id and name."""

    key: str
    flow_run_id: UUID
    flow_run_name: str
    since: float = field(default_factory=time.monotonic)

    def named(self) -> str:
        return f"flow run {self.flow_run_name} ({self.flow_run_id})"


def submit(deployment: DeploymentResponse, key: str, what: str, flow_run_name: str, parameters: dict,
           tags: list[str]) -> Submitted:
    """One flow run of ``deployment`` for ``key`` (``what``: how the console names it); returns at once
    (``timeout=0``)."""
    flow_run = run_deployment(deployment.id, timeout=0, flow_run_name=flow_run_name, tags=["bertshrink", *tags],
                              parameters=parameters)
    print(f"bertshrink: submitted {what} as flow run {flow_run.name} ({flow_run.id}) to work pool "
          f"{deployment.work_pool_name}.", file=sys.stderr)
    return Submitted(key, flow_run.id, flow_run.name)


def run_on_pool(scale: ScaleOutParams, submit_next: Callable[[int], Submitted | None],
                ended: Callable[[Submitted, str | None], None]) -> None:
    """Submit flow runs while ``submit_next(in flight)`` gives one (at most ``scale.concurrency`` in
    flight), poll their states, and call ``ended(run, None or why it did not complete)`` for each.

    A run still unfinished after ``scale.recipe_timeout_minutes`` is cancelled: a worker killed outright
    leaves its flow run RUNNING on the server.
    """
    timeout = scale.recipe_timeout_minutes * 60 if scale.recipe_timeout_minutes else None
    running: dict[UUID, Submitted] = {}
    with get_client(sync_client=True) as client:
        while True:
            while len(running) < scale.concurrency and (run := submit_next(len(running))) is not None:
                running[run.flow_run_id] = run
            if not running:
                return
            time.sleep(scale.poll_seconds)
            for run in list(running.values()):
                state = client.read_flow_run(run.flow_run_id).state
                if state is not None and state.is_final():
                    why = None if state.is_completed() else \
                        f"{run.named()} ended {state.name}: {state.message or ''}".rstrip(": ")
                elif timeout and time.monotonic() - run.since > timeout:
                    client.set_flow_run_state(run.flow_run_id, Cancelling(message="scale_out.recipe_timeout_minutes"),
                                              force=True)
                    why = (f"{run.named()} still {state.name if state else 'unknown'} after "
                           f"{scale.recipe_timeout_minutes} min (scale_out.recipe_timeout_minutes); cancelled. "
                           "Was its worker killed?")
                else:
                    continue
                del running[run.flow_run_id]
                ended(run, why)


def wait_for_recipes(deployment: DeploymentResponse, params_file: str, params: Params, recipes: list[str],
                     teacher_version: str, parent_run_id: str | None) -> dict[str, str | None]:
    """Submit ``recipes`` (at most ``scale_out.concurrency`` in flight) and wait for each to end;
    returns recipe -> None (completed) or why it did not."""
    pending, outcome = list(recipes), {}

    def submit_next(_: int) -> Submitted | None:
        if not pending:
            return None
        recipe = pending.pop(0)
        return submit(deployment, recipe, f"recipe {recipe}", f"recipe-{recipe}", {
            "params_file": params_file, "recipe": recipe, "teacher_version": teacher_version,
            "recipe_fingerprint": recipe_fingerprint(params.compress.recipes[recipe]),
            "parent_run_id": parent_run_id}, [f"recipe:{recipe}"])

    run_on_pool(params.scale_out, submit_next,
                lambda run, why: outcome.__setitem__(run.key, why))
    return outcome


def teacher_version_of(params: Params) -> str:
    """The version the register stage gave the teacher (its record), which the workers fetch."""
    record = Artifacts(params.base).registry_record(TEACHER)
    if not record.is_file():
        raise ScaleOutError(f"{record} not found: the teacher must be registered before recipes fan out.")
    return json.loads(record.read_text())["version"]


def fan_out_recipes(params: Params, params_file: str, parent_run_id: str | None,
                    deployment: DeploymentResponse) -> tuple[list[dict], list[dict], dict[str, str]]:
    """Every recipe on the work pool (except those already registered for this teacher), then each
    candidate fetched here. Returns (evaluation results, registration records, {recipe: why it failed})."""
    paths = Artifacts(params.base)
    teacher_version, teacher_print = teacher_version_of(params), content_fingerprint(paths.teacher)
    done, to_run = {}, []
    for name in params.compress.recipes:
        version = registered_version(params, name, teacher_print)
        if version is not None:
            print(f"bertshrink: recipe {name} is already registered for this teacher (version {version}); "
                  "not run again.", file=sys.stderr)
            done[name] = version
        else:
            to_run.append(name)
    outcome = wait_for_recipes(deployment, params_file, params, to_run, teacher_version, parent_run_id)
    failed = {name: why for name, why in outcome.items() if why}
    results, records = [], []
    for name in params.compress.recipes:
        if name in failed:
            continue
        version = done.get(name) or registered_version(params, name, teacher_print)
        if version is None:  # completed, but the candidate collapsed and stayed on the worker
            records.append({"name": params.registry.model_name, "alias": name, "registered": False,
                            "reason": "collapsed on its worker (see its evaluation run); not registered"})
            continue
        try:
            record = fetch_candidate_task(params, name, version)
        except Exception as err:  # one candidate that cannot be fetched must not stop the others
            failed[name] = f"fetch: {type(err).__name__}: {err}"
            continue
        records.append(record)
        results.append({**json.loads(paths.metrics(name).read_text()), "model_dir": record["model_dir"]})
    return results, records, failed


def registered_version(params: Params, name: str, teacher_print: str) -> str | None:
    """The registered version of recipe ``name`` as written now, on this teacher (by content), or None."""
    version = done_recipe_version(params.registry.model_name, name, teacher_print,
                                  recipe_fingerprint(params.compress.recipes[name]))
    return str(version.version) if version else None
