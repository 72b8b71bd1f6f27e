"""A real Prefect work pool for the fan-out tests (recipes: test_fan_out.py; search trials:
test_search_fan_out.py): a Prefect server, the pool ``local`` with deployments from prefect.yaml, and
two process workers on checkouts of their own (no shared disk with the submitting folder), tracking to
the session's MLflow server on PostgreSQL (tests/service_fixtures.py). Started on localhost, stopped
afterwards, also when a test fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import yaml

from conftest import build_tiny_bert, toy_corpus
from services.prefect_pool import PrefectPool

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def prefect_stack(tmp_path: Path, tracking_uri: str, deployments: tuple[str, ...],
                  extra_env: dict | None = None, zombie_within_s: float | None = None) -> Iterator[dict]:
    """Prefect server + work pool `local` + ``deployments`` (prefect.yaml names) + 2 workers (w1, w2;
    one flow run at a time each), from services/prefect_pool.py; yields ``env`` (for the submitter),
    ``workers`` (name -> checkout), ``tmp``, ``api`` and ``worker_processes``. ``extra_env`` reaches the
    submitter and the workers' flow runs; ``zombie_within_s`` creates the zombie automation with that window."""
    pool = PrefectPool(tmp_path, tracking_uri, REPO)
    try:
        pool.start(deployments)
        if zombie_within_s is not None:
            pool.crash_zombies(zombie_within_s)
        workers = {name: pool.start_worker(name, extra_env) for name in ("w1", "w2")}
        yield {"env": {**pool.env, **(extra_env or {})}, "workers": workers, "tmp": tmp_path, "api": pool.api,
               "worker_processes": {name: process for name, (process, _) in pool.workers.items()}}
    finally:
        pool.stop()


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
