"""Recipes fanned out over a real Prefect work pool: a Prefect server, two process workers on checkouts
of their own (no shared disk with the submitting folder), and an MLflow tracking server on PostgreSQL
that proxies the artifacts (tests/prefect_stack.py, tests/service_fixtures.py). Everything is started
here on localhost and stopped afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from prefect_stack import REPO, flow_runs, prefect_stack, run_pipeline, share_params, write_params



@pytest.fixture
def stack(tmp_path, mlflow_tracking_uri):
    """Prefect server + work pool `local` + the `recipe` deployment + 2 workers, on the session's MLflow
    server (PostgreSQL, proxied artifacts)."""
    with prefect_stack(tmp_path, mlflow_tracking_uri, ("recipe",)) as started:
        yield started


def recipe_versions(tracking_uri: str, model_name: str, recipe: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).search_model_versions(f"name='{model_name}' and tags.recipe='{recipe}'")


RECIPES = {"onnx": ["export_onnx"], "drop": [{"drop_layers": {"strategy": "top", "n_drop": 1}}]}


@pytest.mark.e2e
@pytest.mark.slow
def test_recipes_fan_out_over_two_workers_and_a_rerun_skips_them(stack):
    submitter = stack["tmp"] / "submitter"
    submitter.mkdir()
    share_params(write_params(submitter, RECIPES, "fanned"), stack["workers"])

    done = run_pipeline(submitter, stack["env"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "submitted recipe onnx" in done.stderr and "submitted recipe drop" in done.stderr
    # this server has no zombie automation: the pipeline says what a dead worker would cost and how to fix it
    assert "has no automation 'bertshrink: crash flow runs whose heartbeats stopped'" in done.stderr
    assert "waited for without end" in done.stderr and "python -m flows.zombies" in done.stderr

    # each worker built candidates in its own checkout; the two recipes were spread over both workers
    built = {name: sorted(p.name for p in (home / "models/candidates").glob("*")) for name, home in
             stack["workers"].items()}
    assert sorted(built["w1"] + built["w2"]) == ["drop", "onnx"], built
    assert built["w1"] and built["w2"], built
    # the workers fetched the teacher from the tracking server: byte for byte the submitter's
    from bertshrink.modelfolder.size import content_fingerprint

    teacher_print = content_fingerprint(submitter / "models/teacher")
    assert all(content_fingerprint(home / "models/teacher") == teacher_print for home in stack["workers"].values())

    # the submitter fetched both candidates, timed them side by side and registered nothing twice
    tracking_uri = stack["env"]["MLFLOW_TRACKING_URI"]
    for recipe in RECIPES:
        versions = recipe_versions(tracking_uri, "fanned", recipe)
        assert len(versions) == 1
        assert versions[0].tags["teacher_model_fingerprint"] == teacher_print
        assert content_fingerprint(submitter / "models/candidates" / recipe) == versions[0].tags["model_fingerprint"]
    comparison = json.loads((submitter / "metrics/comparison.json").read_text())
    assert {"teacher", "onnx", "drop"} <= set(json.dumps(comparison).replace('"', " ").split())
    assert (submitter / "reports/promotion.json").is_file()

    # a rerun submits nothing: both recipes are registered for this teacher as written
    again = run_pipeline(submitter, stack["env"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "submitted recipe" not in again.stderr
    assert again.stderr.count("already registered for this teacher") == 2
    assert all(len(recipe_versions(tracking_uri, "fanned", r)) == 1 for r in RECIPES)


def flow_run_of(api: str, env: dict, recipe: str, state: str) -> dict | None:
    """The newest flow run named ``recipe-<recipe>`` in ``state``, through the Prefect API (None also
    while the server, on SQLite and a loaded machine, is too slow to answer)."""
    found = flow_runs(api, {"flow_runs": {"name": {"any_": [f"recipe-{recipe}"]}, "state": {"type": {"any_": [state]}}},
                            "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    return found[0] if found else None


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_recipe_is_named_and_the_others_are_kept(stack):
    submitter = stack["tmp"] / "submitter"
    submitter.mkdir()
    recipes = {"onnx": ["export_onnx"], "slow": [{"distill": {"student_layers": 1, "epochs": 100, "batch_size": 2}}]}
    share_params(write_params(submitter, recipes, "killed"), stack["workers"])

    pipeline = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", "--no-dvc-commit"],
                                cwd=submitter, env={**stack["env"], "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while (run := flow_run_of(stack["api"], stack["env"], "slow", "RUNNING")) is None:
            if pipeline.poll() is not None:
                pytest.fail(f"the pipeline ended before the slow recipe ran:\n{pipeline.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the slow recipe never started"
            time.sleep(1)
        time.sleep(5)   # into its training
        # the process worker records the flow run's process; killing it is what a worker's death does to the run
        pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
        os.kill(pid, signal.SIGKILL)
        _, stderr = pipeline.communicate(timeout=600)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    assert pipeline.returncode != 0
    assert "slow" in stderr.splitlines()[-1] or "- slow:" in stderr, stderr[-3000:]
    tracking_uri = stack["env"]["MLFLOW_TRACKING_URI"]
    assert recipe_versions(tracking_uri, "killed", "slow") == []          # nothing registered for the killed recipe
    assert len(recipe_versions(tracking_uri, "killed", "onnx")) == 1      # the other recipe's result is kept
    assert (submitter / "models/candidates/onnx").is_dir()


def test_the_zombie_automation_file_is_prefects_schema_and_the_name_the_pipeline_looks_for():
    from prefect.events.schemas.automations import AutomationCore, Posture

    from flows.zombies import AUTOMATION_FILE, ZOMBIE_AUTOMATION, zombie_automation

    automation = AutomationCore.model_validate(yaml.safe_load(AUTOMATION_FILE.read_text()))
    assert automation.name == ZOMBIE_AUTOMATION
    assert automation.trigger.posture == Posture.Proactive and automation.trigger.within.total_seconds() == 600
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    assert [action.state.value for action in automation.actions] == ["CRASHED"]
    assert zombie_automation(within_s=90).trigger.within.total_seconds() == 90


@pytest.fixture
def zombie_stack(tmp_path, mlflow_tracking_uri):
    """The stack with the zombie automation, heartbeats every 30 s (Prefect's minimum) and a 90 s window."""
    with prefect_stack(tmp_path, mlflow_tracking_uri, ("recipe",), {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
                       zombie_within_s=90) as started:
        yield started


@pytest.mark.e2e
@pytest.mark.slow
def test_a_worker_machine_that_dies_is_found_by_its_missing_heartbeats(zombie_stack):
    """Worker and flow run killed together, as when their machine goes down: nobody reports the run, the
    server's automation marks it Crashed, and the pipeline names it with no recipe time-out set."""
    stack = zombie_stack
    submitter = stack["tmp"] / "submitter"
    submitter.mkdir()
    recipes = {"onnx": ["export_onnx"], "slow": [{"distill": {"student_layers": 1, "epochs": 100, "batch_size": 2}}]}
    share_params(write_params(submitter, recipes, "zombie"), stack["workers"])   # recipe_timeout_minutes: null

    pipeline = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", "--no-dvc-commit"],
                                cwd=submitter, env={**stack["env"], "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while (run := flow_run_of(stack["api"], stack["env"], "slow", "RUNNING")) is None or \
                flow_run_of(stack["api"], stack["env"], "onnx", "COMPLETED") is None:
            if pipeline.poll() is not None:
                pytest.fail(f"the pipeline ended before the slow recipe ran:\n{pipeline.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the slow recipe never started (or onnx never finished)"
            time.sleep(1)
        # the workers first, so that none is left to see its flow run's process end and report it
        for worker in stack["worker_processes"].values():
            os.killpg(worker.pid, signal.SIGKILL)
        try:
            os.kill(int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1]), signal.SIGKILL)
        except ProcessLookupError:
            pass   # it was in its worker's process group
        killed = time.monotonic()
        _, stderr = pipeline.communicate(timeout=600)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    assert pipeline.returncode != 0
    assert "- slow:" in stderr and "ended Crashed: its heartbeats stopped" in stderr, stderr[-3000:]
    assert "scale_out.recipe_timeout_minutes" not in stderr.split("- slow:", 1)[1]
    assert "has no automation" not in stderr
    assert time.monotonic() - killed < 420, "found by the automation: 90 s window plus the comparison"
    tracking_uri = stack["env"]["MLFLOW_TRACKING_URI"]
    assert recipe_versions(tracking_uri, "zombie", "slow") == []
    assert len(recipe_versions(tracking_uri, "zombie", "onnx")) == 1


def test_a_zombie_window_shorter_than_two_heartbeats_is_refused(capsys):
    from flows.zombies import main

    with pytest.raises(SystemExit) as refused:
        main(["--within", "20"])
    assert refused.value.code == 2 and "shorter than two heartbeats" in capsys.readouterr().err
