"""Prefect's temporary server, which a killed run leaves behind: stop those at the next start.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server (a uvicorn subprocess, about
200 MB) for the run and stops it at exit. A SIGKILL skips that exit, and the server runs on for
good. Each CLI process marks the servers it starts (they inherit its environment) with its pid
and start time; at the next start, a marked server whose owner is gone is stopped. A server
someone started by hand (``prefect server start``), or one whose owner still runs, is not touched.

With ``PREFECT_API_URL`` set, the server must answer before a run starts (``require_prefect_server``).
"""

from __future__ import annotations

import logging
import os

import psutil
from prefect.settings import get_current_settings

from bertshrink.errors import ServerUnavailableError
from tracking.runs import http_unreachable, without_credentials

OWNER_ENV = "BERTSHRINK_PREFECT_SERVER_OWNER"
# What Prefect's SubprocessASGIServer passes uvicorn (prefect/server/api/server.py).
SERVER_APP = "prefect.server.api.server:create_app"

log = logging.getLogger(__name__)


def owner_mark(process: psutil.Process) -> str:
    """``<pid>:<start time>``: the start time tells a reused pid from the owner."""
    return f"{process.pid}:{process.create_time():.2f}"


def mark_servers_as_mine() -> None:
    """Temporary servers this process starts from now on carry its mark (environment is inherited)."""
    os.environ[OWNER_ENV] = owner_mark(psutil.Process())


def _owner_alive(mark: str) -> bool:
    pid, _, started = mark.partition(":")
    try:
        return owner_mark(psutil.Process(int(pid))) == f"{int(pid)}:{started}"
    except (psutil.NoSuchProcess, ValueError):
        return False


def orphaned_servers() -> list[psutil.Process]:
    """Temporary Prefect servers started by a bertshrink process that no longer runs."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if SERVER_APP not in (process.info["cmdline"] or []):
                continue
            mark = process.environ().get(OWNER_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if mark and not _owner_alive(mark):
            found.append(process)
    return found


def stop_orphaned_servers(timeout: float = 5.0) -> list[int]:
    """Stop the temporary servers killed runs left (terminate, then kill); returns their pids."""
    servers = orphaned_servers()
    for server in servers:
        server.terminate()
    _, still_running = psutil.wait_procs(servers, timeout=timeout)
    for server in still_running:
        server.kill()
    psutil.wait_procs(still_running, timeout=timeout)
    if servers:
        log.warning("Stopped %d Prefect temporary server(s) that killed runs had left running (pids %s).",
                    len(servers), ", ".join(str(s.pid) for s in servers))
    return [s.pid for s in servers]


def require_prefect_server(timeout_s: float = 10.0) -> None:
    """Before any work: a ``PREFECT_API_URL`` (environment or Prefect profile) must answer, or the
    run stops here naming it. Without one, Prefect starts a temporary server and nothing is checked."""
    url = get_current_settings().api.url
    if not url:
        return
    why = http_unreachable(f"{url.rstrip('/')}/health", timeout_s)
    if why:
        raise ServerUnavailableError(
            f"PREFECT_API_URL={without_credentials(url)} cannot be reached ({why}). Start the Prefect server "
            "(`prefect server start`), correct the setting, or unset it (`unset PREFECT_API_URL`, or "
            "`prefect config unset PREFECT_API_URL` where a profile sets it) to run on a temporary local server.")
