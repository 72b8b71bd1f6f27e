"""An MLflow tracking server (``mlflow server``) on a backend store, with proxied artifact storage.

The server stores runs and the registry in the backend (PostgreSQL here) and serves artifacts
itself (``--artifacts-destination``: a local folder or ``s3://...``), so clients need no access to
the artifact store. It runs in a session of its own (its workers with it); its pid is kept in a
file so a later ``stop`` finds it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.postgres import ServiceError


@dataclass(frozen=True)
class MlflowServer:
    """One server on ``host:port``; its pid file and log in ``home``."""

    home: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def uri(self) -> str:
        """Where clients on this machine reach it (``MLFLOW_TRACKING_URI``)."""
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "mlflow.pid"

    @property
    def log(self) -> Path:
        return self.home / "mlflow.log"

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """``GET /health`` answers ``OK``."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, backend_uri: str, artifacts: str, env: dict[str, str], workers: int = 2,
              timeout_s: float = 240.0) -> None:
        """Start the server and wait for ``/health``; on failure, stop it and raise with its log's tail.

        ``env`` is the server's whole environment (it carries ``PGPASSFILE``, never a password in
        ``backend_uri``). MLflow's engine pings pooled connections before use (``pool_pre_ping``),
        so the server recovers by itself when PostgreSQL restarts.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                   "--artifacts-destination", artifacts, "--host", self.host, "--port", str(self.port),
                   "--workers", str(workers),
                   # uvicorn restarts a worker that misses its 5 s health check; on a busy machine a
                   # worker still importing MLflow misses it, again and again, and the server never serves.
                   "--uvicorn-opts", "--timeout-worker-healthcheck 300"]
        with open(self.log, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, cwd=self.home)
        self.pid_file.write_text(str(process.pid))
        try:
            self._wait_until_healthy(process, timeout_s)
        except BaseException:  # a failed start, or Ctrl-C while waiting: leave nothing running
            self.stop()
            raise

    def _wait_until_healthy(self, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if process.poll() is not None:
                raise ServiceError(f"the MLflow server exited with {process.returncode}.{self._log_tail()}")
            if time.monotonic() > deadline:
                raise ServiceError(f"the MLflow server did not answer {self.uri}/health within {timeout_s:.0f} s."
                                   f"{self._log_tail()}")
            time.sleep(0.5)

    def process(self) -> psutil.Process | None:
        """The server this folder's pid file names, if it still runs (a reused pid is not it)."""
        try:
            process = psutil.Process(int(self.pid_file.read_text()))
            command = " ".join(process.cmdline())
        except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return process if "mlflow" in command and " server " in command and str(self.port) in command else None

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the server and its workers (its whole session); returns whether one was running."""
        process = self.process()
        self.pid_file.unlink(missing_ok=True)
        if process is None:
            return False
        group = [process, *process.children(recursive=True)]
        _signal_session(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(group, timeout=timeout_s)
        if alive:
            _signal_session(process.pid, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=timeout_s)
        return True

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- {self.log} (last lines) ---\n" + "\n".join(tail)


def _signal_session(leader_pid: int, sig: int) -> None:
    """Signal the process group the server leads (started with ``start_new_session``)."""
    try:
        os.killpg(leader_pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
