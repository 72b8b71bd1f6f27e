"""Shared tracking on real engines (issue 16): a real PostgreSQL and a real MLflow tracking server
(``tests/service_fixtures.py``). Two worker processes register into one model at the same time
with the project's registration code, and nothing is lost; PostgreSQL restarting between two
tracking calls is retried through; PostgreSQL staying down fails the run naming the server.

Run as a script, this file is one registering worker (``register_repeatedly``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bertshrink.config.params import RegistryParams
from bertshrink.modelfolder.size import content_fingerprint
from conftest import build_tiny_bert
from tasks.registry import register_model
from tracking.registry import move_alias
from tracking.runs import stage_run

REPO = Path(__file__).resolve().parents[1]
WORKERS, REGISTRATIONS = 2, 3
DATA_HASH = "d" * 64


def worker_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """A worker's environment: this checkout, the shared server, no Prefect API (a temporary one)."""
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**base, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1",
            **extra}


def evaluated_model(root: Path) -> tuple[Path, Path]:
    """A tiny teacher folder and an evaluation result that matches it (what register_model checks)."""
    folder = build_tiny_bert(root / "teacher", 2, meta={"kind": "teacher", "label_names": ["a", "b"],
                                                         "max_length": 32, "data_content_hash": DATA_HASH})
    metrics = root / "teacher.json"
    metrics.write_text(json.dumps({"model_fingerprint": content_fingerprint(folder), "data_content_hash": DATA_HASH,
                                   "metrics": {"test": {"accuracy": 0.75}}}))
    return folder, metrics


def register_repeatedly(worker: int, model_dir: str, metrics_file: str, model_name: str, count: int,
                        sync_dir: Path) -> list[dict]:
    """What a recipe's flow run does at its end, ``count`` times: a register run, ``register_model``
    (log, register, tag, alias ``w<worker>-r<i>``), then ``move_alias`` of ``w<worker>-latest``."""
    registry = RegistryParams(experiment=f"{model_name}-runs", model_name=model_name)
    client = MlflowClient()
    (sync_dir / f"ready-{worker}").touch()
    while not (sync_dir / "go").exists():  # every worker starts registering at the same moment
        time.sleep(0.05)
    records = []
    for i in range(count):
        with stage_run("register", registry) as run_id:
            record = register_model.fn(model_dir, metrics_file, registry, f"w{worker}-r{i}", run_id,
                                       str(sync_dir / f"record-{worker}-{i}.json"))
        move_alias(client, model_name, f"w{worker}-latest", record["version"], f"newest of worker {worker}",
                   f"worker-{worker}")
        client.set_model_version_tag(model_name, record["version"], "test.worker", f"{worker}/{i}")
        records.append({**record, "worker": worker, "i": i})
    return records


@pytest.mark.slow
@pytest.mark.e2e
def test_two_workers_registering_into_one_model_at_once_lose_nothing(mlflow_tracking_uri, tmp_path):
    model_dir, metrics = evaluated_model(tmp_path)
    name = "shared-registry-model"
    workers = [subprocess.Popen(
        [sys.executable, __file__, "--worker", str(w), "--model-dir", str(model_dir), "--metrics", str(metrics),
         "--model-name", name, "--count", str(REGISTRATIONS), "--sync-dir", str(tmp_path)],
        env=worker_env(mlflow_tracking_uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(WORKERS)]
    try:
        deadline = time.monotonic() + 900  # their imports alone take minutes on a loaded 2-core machine
        while not all((tmp_path / f"ready-{w}").exists() for w in range(WORKERS)):
            assert all(p.poll() is None for p in workers), [p.communicate() for p in workers]
            assert time.monotonic() < deadline, "the workers did not get ready"
            time.sleep(0.2)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=900) for p in workers]
    finally:
        for p in workers:
            p.kill()
    for p, (out, err) in zip(workers, outputs):
        assert p.returncode == 0, err[-4000:]
    records = [r for out, _ in outputs for r in json.loads(out.strip().splitlines()[-1])]

    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    versions = {v.version: v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(int(v) for v in versions) == list(range(1, WORKERS * REGISTRATIONS + 1))
    assert sorted(int(r["version"]) for r in records) == sorted(int(v) for v in versions)
    model = client.get_registered_model(name)
    for r in records:
        alias = f"w{r['worker']}-r{r['i']}"
        assert model.aliases[alias] == r["version"]
        tags = client.get_model_version(name, r["version"]).tags
        assert tags["test.worker"] == f"{r['worker']}/{r['i']}" and tags["kind"] == "teacher"
        assert tags["model_fingerprint"] == content_fingerprint(model_dir) and tags["flavor"] == "transformers"
        assert tags["metric.test.accuracy"] == "0.75"
        # every version a worker's "latest" alias passed through keeps that decision's tags
        assert tags[f"promotion.w{r['worker']}-latest.set_by"] == f"worker-{r['worker']}"
    for w in range(WORKERS):
        newest = max((r for r in records if r["worker"] == w), key=lambda r: r["i"])
        assert model.aliases[f"w{w}-latest"] == newest["version"]
    assert len(model.aliases) == WORKERS * REGISTRATIONS + WORKERS
    runs = client.search_runs([client.get_experiment_by_name(f"{name}-runs").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * (WORKERS * REGISTRATIONS)


def _tracking_client_script(metric_pause_file: Path) -> str:
    """A client process: one run, a metric, (PostgreSQL goes down here) a second metric, end the run."""
    return (
        "import pathlib, time\n"
        "from bertshrink.config.params import RegistryParams\n"
        "from tracking.runs import log_metrics, stage_run\n"
        "with stage_run('restart', RegistryParams(experiment='postgres-restart')) as run_id:\n"
        "    log_metrics(run_id, {'before': 1.0})\n"
        f"    pause = pathlib.Path({str(metric_pause_file)!r})\n"
        "    pause.write_text(run_id)\n"
        "    while pause.exists():\n"
        "        time.sleep(0.05)\n"
        "    log_metrics(run_id, {'during': 2.0})\n"
        "print(run_id)\n")


def server_errors(server) -> int:
    """How many requests the server has answered with 500 or 503 (its database down) so far."""
    log = server.log.read_text(errors="replace")
    return log.count('HTTP/1.1" 503 ') + log.count('HTTP/1.1" 500 ')


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.slow
def test_postgres_restarting_between_two_tracking_calls_is_retried_through(postgres, mlflow_server, tmp_path):
    """The server answers 503 (or 500) while its database is down; MLflow's client retries (backoff 1 s here,
    7 tries by default) and the call lands once PostgreSQL is back; the run ends FINISHED."""
    pause = tmp_path / "paused"
    log_before = server_errors(mlflow_server)
    client = subprocess.Popen([sys.executable, "-c", _tracking_client_script(pause)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=worker_env(mlflow_server.uri, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"))
    try:
        _wait_for(pause, client)
        postgres.stop()
        pause.unlink()  # the client's next call meets a server without its database
        time.sleep(4)
        postgres.start()
        out, err = client.communicate(timeout=300)
    finally:
        client.kill()
        if not postgres.running():
            postgres.start()
    assert client.returncode == 0, err[-4000:]
    run = MlflowClient(tracking_uri=mlflow_server.uri).get_run(out.strip().splitlines()[-1])
    assert run.data.metrics == {"before": 1.0, "during": 2.0} and run.info.status == "FINISHED"
    assert server_errors(mlflow_server) > log_before  # it did meet the outage


# The CLI entry every stage runs (run_cli), with a stage's first tracking call as its work: a
# whole stage would first start Prefect's temporary server, which is not what this test is about.
STAGE_START = ("from flows._cli import run_cli\n"
               "from tracking.runs import configure_tracking\n"
               "run_cli(lambda params: configure_tracking(params.registry), 'params.yaml')\n")


@pytest.mark.slow
def test_postgres_staying_down_fails_the_run_naming_the_tracking_server(postgres, mlflow_server, tmp_path):
    """Through the CLI entry: the server answers /health, but every call gets a 5xx until MLflow's
    retries are spent; the run ends with one line naming MLFLOW_TRACKING_URI, exit 10."""
    (tmp_path / "params.yaml").write_text("base:\n  reports_dir: out\n")
    postgres.stop()
    try:
        done = subprocess.run([sys.executable, "-c", STAGE_START], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, env=worker_env(mlflow_server.uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                                                          MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"))
    finally:
        postgres.start()
    assert done.returncode == 10, done.stderr[-3000:]
    first = [line for line in done.stderr.splitlines() if line.startswith("bertshrink:")][0]
    assert first.startswith(f"bertshrink: ServerUnavailableError: the MLflow tracking server "
                            f"MLFLOW_TRACKING_URI={mlflow_server.uri} kept failing"), first
    assert f"API request to {mlflow_server.uri}/api/2.0/mlflow/" in first and "error responses" in first  # 500/503
    assert "Traceback (most recent call last)" in (tmp_path / "out" / "logs" / "bertshrink.log").read_text()
    assert MlflowClient(tracking_uri=mlflow_server.uri).search_experiments()  # back up afterwards


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="one registering worker of the shared-registry test")
    for option in ("--worker", "--count"):
        parser.add_argument(option, type=int, required=True)
    for option in ("--model-dir", "--metrics", "--model-name", "--sync-dir"):
        parser.add_argument(option, required=True)
    args = parser.parse_args(argv)
    records = register_repeatedly(args.worker, args.model_dir, args.metrics, args.model_name, args.count,
                                  Path(args.sync_dir))
    print(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1:])
