"""A tracking server or Prefect API that cannot be reached stops a run before any work, with one
line naming the variable (credentials stripped) and exit 10; credentials in a URL never reach a
message or the run log. Issue 16, faults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from bertshrink.errors import ServerUnavailableError
from service_fixtures import free_port
from tracking.runs import tracking_server_failure, without_credentials

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-Pa55"


def run_prepare(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m flows.prepare`` in ``cwd`` with ``env`` on top of a clean tracking/Prefect setup."""
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    (cwd / "params.yaml").write_text("base:\n  reports_dir: out\n")
    return subprocess.run([sys.executable, "-m", "flows.prepare"], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**base, "PYTHONPATH": str(REPO), **env})


def bertshrink_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("bertshrink:")]


@pytest.mark.slow  # a CLI process: its imports take ~10 s on 2 busy cores; the check itself milliseconds
@pytest.mark.parametrize("variable, value, shown", [
    ("MLFLOW_TRACKING_URI", "http://alice:{secret}@127.0.0.1:{port}", "MLFLOW_TRACKING_URI=http://127.0.0.1:{port} "),
    ("PREFECT_API_URL", "http://alice:{secret}@127.0.0.1:{port}/api", "PREFECT_API_URL=http://127.0.0.1:{port}/api "),
])
def test_an_unreachable_server_stops_the_run_before_any_work(tmp_path, variable, value, shown):
    port = free_port()  # nothing listens there
    done = run_prepare(tmp_path, **{variable: value.format(secret=SECRET, port=port)})
    assert done.returncode == 10, done.stderr[-3000:]
    lines = bertshrink_lines(done)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"bertshrink: ServerUnavailableError: {shown.format(port=port)}cannot be reached ("), lines
    assert "Connection refused" in lines[0] and "unset" in lines[0]
    assert SECRET not in done.stdout + done.stderr + (tmp_path / "out" / "logs" / "bertshrink.log").read_text()
    # Nothing ran: no data, no tracking store, not even Prefect's temporary server (started before a stage's
    # first MLflow call, which would then retry for minutes).
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()
    assert "Starting temporary server" not in done.stderr


def test_credentials_are_stripped_from_every_url_in_a_text():
    text = f"API request to https://bob:{SECRET}@mlflow.example.com:443/api/2.0 failed; see http://host:5000/x@y"
    assert without_credentials(text) == ("API request to https://mlflow.example.com:443/api/2.0 failed; "
                                         "see http://host:5000/x@y")
    assert without_credentials("postgresql+psycopg2://u:p@db:5432/mlflow") == "postgresql+psycopg2://db:5432/mlflow"


def test_a_call_that_failed_at_the_tracking_server_is_named_as_such(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:{SECRET}@127.0.0.1:5000")
    spent = MlflowException(f"API request to http://bob:{SECRET}@127.0.0.1:5000/api/2.0/mlflow/runs/log-metric "
                            "failed with exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries "
                            "exceeded (Caused by ResponseError('too many 503 error responses'))")
    error = tracking_server_failure(spent)
    assert isinstance(error, ServerUnavailableError) and error.exit_code == 10
    assert str(error).startswith("the MLflow tracking server MLFLOW_TRACKING_URI=http://127.0.0.1:5000 kept failing")
    assert "too many 503 error responses" in str(error) and SECRET not in str(error)
    assert tracking_server_failure(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")) is None
    assert tracking_server_failure(ValueError("API request to x failed with exception y")) is None
