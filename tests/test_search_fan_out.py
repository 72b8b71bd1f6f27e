"""Search trials fanned out as flow runs of the ``search-trial`` deployment (issue 16).

The unit tests at the top need no server: the study's storage must be a database server, when to
submit another trial with trials in flight (the budget), and a trial asked in one process and told in
another. The slow test at the bottom runs a tiny search over a real Prefect work pool (two process
workers on checkouts of their own, tests/prefect_stack.py) with the study in the session's PostgreSQL
and MLflow on it (tests/service_fixtures.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from bertshrink.config.params import parse_params
from bertshrink.config.search import SearchParams
from bertshrink.errors import ScaleOutError
from bertshrink.search.space import suggest
from bertshrink.search.study import (FULL, OWNER, PROXY, SCORES, Budget, more_full_trials,
                                     more_proxy_trials, require_server_storage)
from prefect_stack import REPO, flow_runs, prefect_stack, run_pipeline, share_params, write_params
from test_search import MINILM, SMALL, TINY_SPACE, fake_scores, open_study, run_proxy_trial


def test_trials_on_a_pool_need_the_study_on_a_database_server():
    for storage, shown in ((None, "null (a SQLite file"), ("sqlite:///study.db", "sqlite:///study.db")):
        with pytest.raises(ScaleOutError, match="search.storage is") as refused:
            require_server_storage(storage)
        assert shown in str(refused.value) and "PGPASSWORD" in str(refused.value)
    require_server_storage("postgresql+psycopg2://bertshrink@db-host:5432/optuna")


def test_without_a_prefect_server_trials_stay_local_unless_the_params_insist():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.search import search_deployment

    with temporary_settings({PREFECT_API_URL: None}):
        assert search_deployment(parse_params({})) is None
        with pytest.raises(ScaleOutError, match="work pool runs the search trials"):
            search_deployment(parse_params({"scale_out": {"mode": "deployment"}}))
    with pytest.raises(Exception, match="scale_out.search_deployment"):
        parse_params({"scale_out": {"search_deployment": "no-slash"}})


def spent(minutes: float = 10.0) -> Budget:
    """A budget of ``minutes`` that ran out a minute ago."""
    return Budget(minutes, 0.4, started=time.monotonic() - (minutes + 1) * 60)


def test_no_new_trial_is_submitted_once_the_budget_is_spent(tmp_path):
    study, search = open_study(tmp_path), SearchParams(max_trials=4)
    fresh = Budget(10.0, 0.4)
    # within the budget: up to max_trials attempted or in flight
    assert more_proxy_trials(study, search, fresh, in_flight=3)
    assert not more_proxy_trials(study, search, fresh, in_flight=4)
    # budget spent, nothing finished: one trial still starts, but not while one is under way
    assert more_proxy_trials(study, search, spent(), in_flight=0)
    assert not more_proxy_trials(study, search, spent(), in_flight=1)
    run_proxy_trial(study)
    assert not more_proxy_trials(study, search, spent(), in_flight=0)
    assert more_proxy_trials(study, search, fresh, in_flight=2) and not more_proxy_trials(study, search, fresh, 3)
    # the full stage: only enqueued trials, one at least whatever the clock says
    assert not more_full_trials(study, fresh)
    study.enqueue_full([0])
    assert more_full_trials(study, spent(), in_flight=0) and not more_full_trials(study, spent(), in_flight=1)
    assert more_full_trials(study, fresh, in_flight=1)


WORKER = """
import sys
from bertshrink.config.knobs import PromotionConstraints
from bertshrink.search.study import PROXY, SearchStudy
from test_search import fake_scores
study = SearchStudy(sys.argv[1], "unit", "nsga2", 0, PromotionConstraints(min_retention=0.95))
spec = study.spec(PROXY, int(sys.argv[2]))
study.claim(spec)
study.tell(spec, fake_scores(spec.values), mlflow_run_id="run-on-the-worker")
"""


def test_a_trial_asked_here_is_told_by_a_worker_process(tmp_path):
    study = open_study(tmp_path)
    asked = study.ask(PROXY, lambda trial: suggest(trial, SMALL, MINILM))
    assert study.unfinished(asked)
    worker = subprocess.run([sys.executable, "-c", WORKER, study.storage, str(asked.number)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert worker.returncode == 0, worker.stderr
    told = open_study(tmp_path).trial(PROXY, asked.number)
    assert told.state == TrialState.COMPLETE and told.params == asked.values
    assert told.user_attrs[SCORES] == fake_scores(asked.values) and told.user_attrs["mlflow_run_id"] == "run-on-the-worker"
    assert told.user_attrs[OWNER].split(":")[1] != str(os.getpid())   # the worker claimed it
    assert not study.unfinished(asked)


# ---------------------------------------------------------------- over a real work pool


@pytest.fixture
def study_db(postgres, monkeypatch) -> str:
    """A database of its own for the study in the session's PostgreSQL; its URL (no password)."""
    postgres.create_database("optuna_fan_out")
    monkeypatch.setenv("PGPASSFILE", postgres.client_env()["PGPASSFILE"])   # for optuna in this process
    return postgres.url("optuna_fan_out")


@pytest.fixture
def stack(tmp_path, mlflow_tracking_uri, postgres):
    with prefect_stack(tmp_path, mlflow_tracking_uri, ("recipe", "search-trial"), postgres.client_env()) as started:
        yield started


def search_section(storage: str | None) -> dict:
    return {"search": {"enabled": True, "storage": storage, "budget_minutes": 30, "max_trials": 2, "eta": 2,
                       "max_full_trials": 1, "max_front_size": 1, "latency_iterations": 3,
                       "proxy": {"train_rows": 30, "epochs": 1}, "space": TINY_SPACE}}


@pytest.mark.slow
@pytest.mark.e2e
def test_search_trials_run_as_flow_runs_on_two_workers_and_tell_the_shared_study(stack, study_db, monkeypatch):
    from mlflow.tracking import MlflowClient

    from bertshrink.modelfolder.size import content_fingerprint

    submitter = stack["tmp"] / "submitter"
    submitter.mkdir()
    share_params(write_params(submitter, {}, "searched", search_section(study_db)), stack["workers"])

    done = run_pipeline(submitter, stack["env"], timeout=1800)   # minutes on an idle machine; niced beside a busy one, more
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("submitted search trial") == 3, done.stderr[-4000:]

    # every trial was a flow run of the search-trial deployment, and both workers ran some
    runs = flow_runs(stack["api"], {"flow_runs": {"name": {"like_": "search-"}}})
    assert sorted(r["name"] for r in runs) == ["search-full-0", "search-proxy-0", "search-proxy-1"]
    assert all(r["state_type"] == "COMPLETED" and r["work_pool_name"] == "local" for r in runs), runs
    ran = {name: sorted(p.name for p in (home / "reports/search/recipes").glob("*.yaml"))
           for name, home in stack["workers"].items()}
    assert len(ran["w1"] + ran["w2"]) == 3 and ran["w1"] and ran["w2"], ran
    assert not (submitter / "reports/search/recipes").exists()   # no trial ran on the submitting machine

    # the study in PostgreSQL holds them, complete, told by the workers
    front = json.loads((submitter / "reports/search/front.json").read_text())
    assert front["storage"] == study_db and front["trials"] == {"proxy": 2, "full": 1} and not front["failed"]
    for stage, count in ((PROXY, 2), (FULL, 1)):
        trials = optuna.load_study(study_name=front["studies"][stage], storage=study_db).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * count
        assert all(SCORES in t.user_attrs and t.user_attrs["mlflow_run_id"] for t in trials)

    # the full trial's model came back through its MLflow run; the front is registered
    full = optuna.load_study(study_name=front["studies"][FULL], storage=study_db).trials[0]
    assert content_fingerprint(submitter / f"checkpoints/search/{front['studies'][FULL]}/trial-0") == \
        full.user_attrs["model_fingerprint"]
    [member] = front["members"]
    client = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("searched", "search-1")
    assert str(version.version) == member["registered_version"] and (submitter / "models/candidates/search-1").is_dir()
    # each trial's MLflow run is a child of the search's run
    trial_run = client.get_run(full.user_attrs["mlflow_run_id"])
    search_run = client.get_run(trial_run.data.tags["mlflow.parentRunId"])
    assert search_run.info.run_name == "search" and trial_run.info.run_name == "search:full-0"

    # with the study in a SQLite file only this machine sees, the server's deployment is refused before any work
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.search import search_deployment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["env"]["MLFLOW_TRACKING_URI"])
    with temporary_settings({PREFECT_API_URL: stack["api"]}):
        assert search_deployment(parse_params({**search_section(study_db)})).name == "search-trial"
        with pytest.raises(ScaleOutError, match="search.storage is null"):
            search_deployment(parse_params(search_section(None)))
