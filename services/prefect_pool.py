"""A Prefect server, a process work pool with the ``recipe`` deployment, and process workers on
checkouts of their own, on this machine: what ``tests/test_fan_out.py`` and
``benchmarks/fan_out_scaling.py`` run recipes on.

Everything runs in sessions of its own (a worker's flow runs with it) and is stopped by process
group; the server keeps its state (SQLite) in the folder it is given.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.postgres import ServiceError

# What a worker's checkout holds: the code and prefect.yaml, nothing the submitting folder made.
PACKAGES = ("bertshrink", "flows", "tasks", "tracking")
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, seconds: float, process: subprocess.Popen) -> None:
    """Until ``url`` answers 200; fails at once if ``process`` (the server) exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"{' '.join(map(str, process.args))} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServiceError(f"{url} did not answer in {seconds:.0f} s")


def worker_checkout(repo: Path, folder: Path) -> Path:
    """A worker's checkout of ``repo`` in ``folder``: the code and prefect.yaml only."""
    folder.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(repo / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo / "prefect.yaml", folder / "prefect.yaml")
    return folder


def prefect_env(api_url: str, home: Path, tracking_uri: str) -> dict[str, str]:
    """The environment of the server, the workers and the submitter: this Prefect server and its
    own PREFECT_HOME, the tracking server, no PYTHONPATH (a worker imports its own checkout)."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def stop_process_group(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop a process started with ``start_new_session`` and everything in its group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout_s)
        except ProcessLookupError:
            pass


@dataclass
class PrefectPool:
    """A Prefect server in ``home`` with work pool ``pool`` (type process) and ``repo``'s deployments;
    workers join with ``start_worker`` and leave with ``stop_workers``; ``stop`` ends it all."""

    home: Path
    tracking_uri: str
    repo: Path
    pool: str = "local"
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    workers: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        return prefect_env(self.api, self.home / "prefect-home", self.tracking_uri)

    def start(self, deployments: tuple[str, ...] = ("recipe",), timeout_s: float = 600) -> None:
        """Server, then the pool, then ``prefect deploy`` of ``deployments`` from ``repo``'s prefect.yaml."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "prefect-server.log", "w") as log:
            self.server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_http(f"{self.api}/health", timeout_s, self.server)
        self._prefect("work-pool", "create", self.pool, "--type", "process")
        self._prefect("--no-prompt", "deploy", *(arg for name in deployments for arg in ("--name", name)))

    def crash_zombies(self, within_s: float | None = None) -> None:
        """The zombie automation on this server, as a team creates it once (``python -m flows.zombies``);
        ``within_s`` shortens its window (tests)."""
        window = [] if within_s is None else ["--within", str(within_s)]
        done = subprocess.run([sys.executable, "-m", "flows.zombies", *window], env=self.env, cwd=self.repo,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"python -m flows.zombies failed (exit {done.returncode}):\n{done.stderr[-3000:]}")

    def _prefect(self, *args: str) -> None:
        done = subprocess.run([*PREFECT, *args], env=self.env, cwd=self.repo, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"prefect {' '.join(args)} failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")

    def start_worker(self, name: str, extra_env: dict[str, str] | None = None) -> Path:
        """A process worker ``name`` (one flow run at a time) on a fresh checkout in ``home/name``;
        returns the checkout. ``extra_env`` reaches its flow runs too (say, thread counts)."""
        checkout = worker_checkout(self.repo, self.home / name)
        with open(self.home / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", self.pool, "--limit", "1", "--name", name],
                env={**self.env, "BERTSHRINK_HOME": str(checkout), **(extra_env or {})}, cwd=checkout, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.workers[name] = (process, checkout)
        return checkout

    def stop_workers(self) -> None:
        """Stop every worker (and the flow runs it started)."""
        for process, _ in self.workers.values():
            stop_process_group(process)
        self.workers.clear()

    def stop(self) -> None:
        """Workers first, then the server."""
        self.stop_workers()
        if self.server is not None:
            stop_process_group(self.server)
