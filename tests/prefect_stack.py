"""A real Prefect work pool for the fan-out tests (recipes: test_fan_out.py; search trials:
test_search_fan_out.py): a Prefect server, the pool ``local`` with deployments from prefect.yaml, and
two process workers on checkouts of their own (no shared disk with the submitting folder), tracking to
the session's MLflow server on PostgreSQL (tests/service_fixtures.py). Started on localhost, stopped
afterwards, also when a test fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import yaml

from conftest import build_tiny_bert, toy_corpus
from service_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bertshrink", "flows", "tasks", "tracking")
PREFECT = [sys.executable, "-m", "prefect"]


def wait_for_http(url: str, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def checkout(folder: Path) -> Path:
    """A worker's checkout: the code and prefect.yaml, nothing the submitting folder made."""
    folder.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", folder / "prefect.yaml")
    return folder


def prefect_env(api_url: str, home: Path, tracking_uri: str) -> dict:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def stop(process: subprocess.Popen) -> None:
    """Stop a process group started here (a worker's flow runs with it)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@contextmanager
def prefect_stack(tmp_path: Path, tracking_uri: str, deployments: tuple[str, ...],
                  extra_env: dict | None = None) -> Iterator[dict]:
    """Prefect server + work pool `local` + ``deployments`` (prefect.yaml names) + 2 workers (w1, w2;
    one flow run at a time each); yields ``env`` (for the submitter), ``workers`` (name -> checkout),
    ``tmp`` and ``api``."""
    started = []
    try:
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {**prefect_env(api, tmp_path / "prefect-home", tracking_uri), **(extra_env or {})}
        server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=open(tmp_path / "prefect-server.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        started.append(server)
        wait_for_http(f"{api}/health", 600, server)
        subprocess.run([*PREFECT, "work-pool", "create", "local", "--type", "process"], env=env, check=True,
                       capture_output=True)
        names = [arg for name in deployments for arg in ("--name", name)]
        deployed = subprocess.run([*PREFECT, "--no-prompt", "deploy", *names], env=env, cwd=REPO,
                                  capture_output=True, text=True)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        workers = {}
        for name in ("w1", "w2"):
            home = checkout(tmp_path / name)
            log = open(tmp_path / f"{name}.log", "w")
            workers[name] = home
            started.append(subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", "local", "--limit", "1", "--name", name],
                env={**env, "BERTSHRINK_HOME": str(home)}, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        yield {"env": env, "workers": workers, "tmp": tmp_path, "api": api}
    finally:
        for process in reversed(started):
            stop(process)


def write_params(folder: Path, recipes: dict, model_name: str, sections: dict | None = None, **overrides) -> Path:
    """Tiny params, as written in the submitting folder and copied into the workers' checkouts;
    ``sections`` adds or replaces whole sections, ``overrides`` go to ``scale_out``."""
    teacher = build_tiny_bert(folder / "encoder", num_labels=None) if not (folder / "encoder").exists() else folder / "encoder"
    corpus = folder / "toy.csv"
    toy_corpus().to_csv(corpus, index=False)
    params = {
        "data": {"source": str(corpus), "validation_size": 0.2, "test_size": 0.2},
        "validate": {"min_train_rows": 20, "min_eval_rows": 5},
        "teacher": {"model": str(teacher), "max_length": 32, "epochs": 2, "batch_size": 8, "warmup_ratio": 0.0,
                    "learning_rate": 3e-3, "logging_steps": 2, "save_steps": 10},
        "evaluate": {"warmup_iterations": 1, "timed_iterations": 3, "max_length": 32, "batch_sizes": [1], "rounds": 1},
        "registry": {"experiment": "fan-out", "model_name": model_name, "min_retention": 0.5, "min_agreement": 0.5},
        "floor": {"enabled": False},
        "compress": {"baseline": None, "recipes": recipes, "max_accuracy_drop": 1.0},  # a 2-epoch teacher: keep every candidate
        "scale_out": {"mode": "deployment", "concurrency": 2, "poll_seconds": 1, **overrides},
        **(sections or {}),
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def share_params(params_file: Path, workers: dict) -> None:
    for home in workers.values():
        shutil.copy(params_file, home / "params.yaml")


def run_pipeline(folder: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", "--no-dvc-commit"],
                          cwd=folder, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=timeout)


def flow_runs(api: str, body: dict) -> list[dict]:
    """Flow runs through the Prefect API's filter (``[]`` while the server, on SQLite and a loaded
    machine, is too slow to answer)."""
    try:
        return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()
    except httpx.HTTPError:
        return []
