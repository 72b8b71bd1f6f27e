"""The persisted Optuna studies of a search, driven trial by trial (ask and tell).

Two studies share one RDB storage (SQLite by default, or the tracking server's PostgreSQL):
``<name>-proxy`` samples many cheap trials (NSGA-II or TPE, with the registry's constraints), and
``<name>-full`` trains the proxy winners, enqueued with their params, on the full budget. Optuna's
pruners do not apply to multi-objective studies; the two studies are successive halving made
explicit. Trials run here or on a work pool's workers (asked here, told there, through a server
RDB). A rerun loads both (``load_if_exists``): finished trials are not repeated, and a trial a
killed process left RUNNING is marked FAIL and its params enqueued again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from bertshrink.config.knobs import PromotionConstraints
from bertshrink.config.search import SearchParams
from bertshrink.errors import ScaleOutError
from bertshrink.search.front import DIRECTIONS, Scored, constraint_margins

PROXY, FULL = "proxy", "full"
STAGES = (PROXY, FULL)
OWNER = "owner"               # user attr: host:pid:process start (ms) of the process running the trial
SCORES, ERROR = "scores", "error"
PROXY_TRIAL, RETRY_OF = "proxy_trial", "retry_of"
KILLED = "its process was killed; params enqueued again"
MODEL_FINGERPRINT = "model_fingerprint"   # user attr of a full trial run on a worker: its model, in its MLflow run
SERVER_BACKENDS = ("postgresql", "mysql")


# ---------------------------------------------------------------- naming and storage


def study_key(search: SearchParams, constraints: PromotionConstraints, teacher_fingerprint: str,
              data_hash: str, seed: int) -> str:
    """8 hex digits naming what a study's scores depend on: the space, the proxy and latency knobs,
    the constraints, the teacher, the data and the seed. Changing any starts a new study (Optuna
    cannot change a parameter's choices within a study); the same settings resume the old one."""
    basis = {"space": search.space.model_dump(mode="json"), "proxy": search.proxy.model_dump(mode="json"),
             "latency_iterations": search.latency_iterations, "sampler": search.sampler,
             "constraints": constraints.model_dump(mode="json"), "teacher": teacher_fingerprint,
             "data": data_hash, "seed": seed}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:8]


def printable_storage(url: str) -> str:
    """The storage URL without its password, for logs, tags and reports."""
    return make_url(url).render_as_string(hide_password=True)


def require_server_storage(storage: str | None) -> None:
    """Trials on other machines tell their scores to the study: it must live on a database server they
    all reach, not in a SQLite file only this machine sees."""
    backend = make_url(storage).get_backend_name() if storage else "sqlite"
    if backend not in SERVER_BACKENDS:
        raise ScaleOutError(
            f"search trials on a work pool need the study on a database server every worker reaches, but "
            f"search.storage is {printable_storage(storage) if storage else 'null (a SQLite file on this machine)'}. "
            "Set search.storage to the tracking server's PostgreSQL, e.g. postgresql+psycopg2://bertshrink@<host>:5432/"
            "optuna (password in PGPASSWORD or ~/.pgpass; `make services` creates the optuna database), or set "
            "scale_out.mode: local to run the trials here.")


def ensure_sqlite_folder(url: str) -> None:
    """SQLite creates the file, not its folder."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- who runs a trial


def owner_id() -> str:
    """This process, as ``host:pid:start-ms``: a later run can tell whether it is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time() * 1000)}"


def owner_gone(owner: str | None) -> bool:
    """The process that owns a RUNNING trial has exited (or its pid now names another process).

    Trials owned on another machine are left alone: their process cannot be seen from here.
    """
    try:
        host, pid, started = (owner or "").rsplit(":", 2)
        pid, started = int(pid), int(started)
    except ValueError:
        return True   # no owner recorded: killed between ask and the first attribute
    if host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(pid).create_time() * 1000 - started) > 1000
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- budget


@dataclass
class Budget:
    """Wall time of one search run: the proxy stage stops at ``1 - full_share`` of it, the full
    stage at all of it (each after the trial in progress; at least one full trial always runs)."""

    minutes: float
    full_share: float
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.started) / 60.0

    def proxy_open(self) -> bool:
        return self.elapsed_minutes < self.minutes * (1.0 - self.full_share)

    def open(self) -> bool:
        return self.elapsed_minutes < self.minutes


def asked_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's attributes as it was asked (such as the proxy trial a full trial came from), without
    what running it added: its owner, scores or error."""
    return {k: v for k, v in trial.user_attrs.items() if k not in (OWNER, ERROR, SCORES)}


# ---------------------------------------------------------------- when to start another trial


def more_proxy_trials(study: "SearchStudy", search: SearchParams, budget: Budget, in_flight: int = 0) -> bool:
    """Start another proxy trial: fewer than ``max_trials`` attempted or under way, and the proxy's share
    of the budget left; past the budget only while no trial finished and none is under way."""
    if study.attempted(PROXY) + in_flight >= search.max_trials:
        return False
    return budget.proxy_open() or (not study.trials(PROXY) and in_flight == 0)


def more_full_trials(study: "SearchStudy", budget: Budget, in_flight: int = 0) -> bool:
    """Start another full trial: one is enqueued and the budget lasts; past the budget only while no
    full trial finished and none is under way (a search always ends with one)."""
    if study.waiting(FULL) == 0:
        return False
    return budget.open() or (not study.trials(FULL) and in_flight == 0)


# ---------------------------------------------------------------- the studies


@dataclass(frozen=True)
class TrialSpec:
    """A trial as a unit of work: plain data, so it can travel to a worker."""

    stage: str
    study: str
    number: int
    values: dict[str, Any]
    user_attrs: dict[str, Any] = field(default_factory=dict)


def _sampler(kind: str, seed: int, constraints: Callable | None) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, n_startup_trials=4)
    # A small population: a search of tens of trials should still see generations evolve.
    return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints, population_size=8)


def _trials_in(storage: str, name: str) -> int:
    """Trials a study already holds (0 for a new one)."""
    try:
        return len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        return 0


class SearchStudy:
    """The proxy and full studies of one search, in one storage."""

    def __init__(self, storage: str, name: str, sampler: str, seed: int, constraints: PromotionConstraints):
        self.storage = storage
        self.constraints = constraints
        self.names = {stage: f"{name}-{stage}" for stage in STAGES}
        limits = [n for n, v in constraints.model_dump().items() if v is not None]
        constraints_func = self._constraint_values if limits else None
        ensure_sqlite_folder(storage)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # A resumed run seeds its sampler past the trials it finds: the same seed would draw the first
        # trials' params again (random first generation), and a duplicate wastes a trial.
        self.studies = {stage: optuna.create_study(
            storage=storage, study_name=self.names[stage], directions=list(DIRECTIONS), load_if_exists=True,
            sampler=_sampler(sampler, seed + 1000 * i + _trials_in(storage, self.names[stage]), constraints_func))
            for i, stage in enumerate(STAGES)}
        self._live: dict[tuple[str, int], optuna.Trial] = {}

    def _constraint_values(self, trial: FrozenTrial) -> list[float]:
        scores = trial.user_attrs.get(SCORES) or {}
        return list(constraint_margins(scores, self.constraints).values())

    # ------------------------------------------------------------ reading
    def trials(self, stage: str, states: Iterable[TrialState] = (TrialState.COMPLETE,)) -> list[FrozenTrial]:
        return self.studies[stage].get_trials(deepcopy=False, states=tuple(states))

    def scored(self, stage: str) -> list[Scored]:
        """The finished trials of ``stage`` as the front sees them."""
        out = []
        for t in self.trials(stage):
            scores = t.user_attrs.get(SCORES) or {}
            out.append(Scored(t.number, t.values[0], t.values[1], t.values[2],
                              constraint_margins(scores, self.constraints)))
        return out

    def trial(self, stage: str, number: int) -> FrozenTrial:
        return self.studies[stage].trials[number]

    def spec(self, stage: str, number: int) -> TrialSpec:
        """Trial ``number`` of ``stage`` as asked (its params and attributes), read from the storage."""
        trial = self.trial(stage, number)
        return TrialSpec(stage, self.names[stage], number, dict(trial.params), asked_attrs(trial))

    def attempted(self, stage: str) -> int:
        """Trials of ``stage`` that ran to an end, finished or failed (one failed by a kill is retried,
        so it does not count)."""
        failed = [t for t in self.trials(stage, (TrialState.FAIL,)) if t.user_attrs.get(ERROR) != KILLED]
        return len(self.trials(stage)) + len(failed)

    def waiting(self, stage: str) -> int:
        return len(self.trials(stage, (TrialState.WAITING,)))

    def duplicate_of(self, stage: str, values: dict) -> FrozenTrial | None:
        """A finished trial of ``stage`` with exactly these params, whose scores can be reused."""
        return next((t for t in self.trials(stage) if t.params == values), None)

    # ------------------------------------------------------------ after a kill
    def recover(self) -> list[str]:
        """Trials left RUNNING by a process that is gone: marked FAIL, their params enqueued again
        (with their user attributes, such as the proxy trial a full trial came from)."""
        recovered = []
        for stage in STAGES:
            study = self.studies[stage]
            for t in self.trials(stage, (TrialState.RUNNING,)):
                if not owner_gone(t.user_attrs.get(OWNER)):
                    continue
                study._storage.set_trial_user_attr(t._trial_id, ERROR, KILLED)
                study.tell(t.number, state=TrialState.FAIL)
                study.enqueue_trial(dict(t.params), user_attrs={**asked_attrs(t), RETRY_OF: t.number})
                recovered.append(f"{self.names[stage]} #{t.number}")
        return recovered

    # ------------------------------------------------------------ ask and tell
    def ask(self, stage: str, suggest: Callable[[optuna.Trial], dict]) -> TrialSpec:
        """A new trial of ``stage`` (an enqueued one first) with its values chosen by ``suggest``."""
        trial = self.studies[stage].ask()
        trial.set_user_attr(OWNER, owner_id())
        values = suggest(trial)
        self._live[(stage, trial.number)] = trial
        attrs = {k: v for k, v in trial.user_attrs.items() if k != OWNER}
        return TrialSpec(stage, self.names[stage], trial.number, values, attrs)

    def _handle(self, spec: TrialSpec) -> optuna.Trial:
        """The trial asked here, or (on a worker, in another process) the same trial loaded by number."""
        live = self._live.pop((spec.stage, spec.number), None)
        if live is not None:
            return live
        return optuna.Trial(self.studies[spec.stage], self.trial(spec.stage, spec.number)._trial_id)

    def claim(self, spec: TrialSpec) -> None:
        """This process now runs ``spec`` (a worker took it over from the submitter): a rerun after this
        process is killed recovers the trial."""
        study = self.studies[spec.stage]
        study._storage.set_trial_user_attr(self.trial(spec.stage, spec.number)._trial_id, OWNER, owner_id())

    def tell(self, spec: TrialSpec, scores: dict, **attrs: Any) -> FrozenTrial:
        """Record a trial's scores (its objectives: validation accuracy, p50 ms, MB)."""
        trial = self._handle(spec)
        for key, value in {SCORES: scores, **attrs}.items():
            trial.set_user_attr(key, value)
        return self.studies[spec.stage].tell(trial, [scores["accuracy"], scores["p50_ms"], scores["size_mb"]])

    def fail(self, spec: TrialSpec, error: str) -> None:
        trial = self._handle(spec)
        trial.set_user_attr(ERROR, error[:2000])
        self.studies[spec.stage].tell(trial, state=TrialState.FAIL)

    def unfinished(self, spec: TrialSpec) -> bool:
        """``spec`` is still RUNNING in the storage: nobody told its end (its worker died)."""
        return self.trial(spec.stage, spec.number).state == TrialState.RUNNING

    # ------------------------------------------------------------ proxy -> full
    def enqueue_full(self, proxy_numbers: Iterable[int]) -> list[int]:
        """Enqueue these proxy trials' params in the full study, unless a full trial already has them."""
        enqueued, full = [], self.studies[FULL]
        for number in proxy_numbers:
            params = dict(self.trial(PROXY, number).params)
            if any(t.params == params or t.system_attrs.get("fixed_params") == params
                   for t in self.trials(FULL, tuple(TrialState))):
                continue
            full.enqueue_trial(params, user_attrs={PROXY_TRIAL: number})
            enqueued.append(number)
        return enqueued
