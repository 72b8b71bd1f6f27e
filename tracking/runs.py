"""MLflow plumbing shared by the tasks: where to track, one run per stage, nested under a parent.

Tracking defaults to ``sqlite:///mlflow.db`` with artifacts in ``mlruns/``; ``MLFLOW_TRACKING_URI``
switches to a tracking server. Runs are addressed by id (``MlflowClient``), not through the
fluent "active run", so Prefect's threads cannot mix them up.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
import psutil
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from bertshrink.config.params import RegistryParams
from bertshrink.errors import ScaleOutError, ServerUnavailableError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = Path("mlruns")
PARENT_RUN_ENV = "BERTSHRINK_PARENT_RUN_ID"
# Which process on which machine owns a run: a run whose process is gone was killed mid-stage.
HOST_TAG, PID_TAG = "bertshrink.host", "bertshrink.pid"
ORPHAN_TAG = "bertshrink.orphaned"
# The ``user:password@`` of a URL: never shown in a message, a log line or a tag.
_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
# What MLflow's REST client raises once its retries against the server are spent.
_REST_FAILURE = re.compile(r"^API request to (\S+) failed with exception")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def without_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed."""
    return _USERINFO.sub("", text)


def http_unreachable(url: str, timeout_s: float) -> str | None:
    """Why no HTTP server answers at ``url``, or None when one does (any status: a server behind
    authentication that says 401 is still there)."""
    try:
        with urllib.request.urlopen(without_credentials(url), timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        return str(err.reason)
    except (TimeoutError, OSError) as err:
        return f"no answer within {timeout_s:.0f} s" if isinstance(err, TimeoutError) else str(err)


def require_tracking_server(timeout_s: float = 10.0) -> None:
    """Before any work: an ``http(s)://`` ``MLFLOW_TRACKING_URI`` must answer, or the run stops here
    (MLflow's own client would retry for minutes, after the training)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    why = http_unreachable(f"{uri.rstrip('/')}/health", timeout_s)
    if why:
        raise ServerUnavailableError(
            f"MLFLOW_TRACKING_URI={without_credentials(uri)} cannot be reached ({why}). Start the tracking "
            "server (`make services` on this machine), correct the variable, or unset it to track in ./mlflow.db.")


def tracking_server_failure(err: BaseException) -> ServerUnavailableError | None:
    """An MLflow call that failed at the tracking server after MLflow's retries (the server or its
    database down for minutes), as an error naming the server; None for any other error."""
    for cause in (err, err.__cause__, err.__context__):
        match = _REST_FAILURE.match(str(cause)) if isinstance(cause, MlflowException) else None
        if match:
            return ServerUnavailableError(
                f"the MLflow tracking server MLFLOW_TRACKING_URI={without_credentials(tracking_uri())} kept failing "
                f"after MLflow's retries: {without_credentials(str(cause))}. Check the server and its database "
                "(their logs), then rerun; MLFLOW_HTTP_REQUEST_MAX_RETRIES sets how long calls retry.")
    return None


def configure_tracking(registry: RegistryParams) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists; returns its id."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment = client.get_experiment_by_name(registry.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        artifact_location = DEFAULT_ARTIFACT_DIR.resolve().as_uri()
    try:
        return client.create_experiment(registry.experiment, artifact_location=artifact_location)
    except MlflowException as err:  # another worker on the same server created it meanwhile
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(registry.experiment).experiment_id


def git_commit() -> str:
    """HEAD's sha, with ``-dirty`` when the tree has uncommitted changes; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _process_gone(pid: int, run_started_ms: int) -> bool:
    """The process that started a run has exited (or its pid now belongs to a newer process)."""
    if pid == os.getpid():
        return False
    try:
        return psutil.Process(pid).create_time() * 1000 > run_started_ms + 1000
    except psutil.NoSuchProcess:
        return True


def fail_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the runs of this experiment left RUNNING by a process on this machine that was
    killed; returns their ids. Runs of live processes, or of other machines, are left alone."""
    client, host, orphans = MlflowClient(), socket.gethostname(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        if _process_gone(int(tags[PID_TAG]), run.info.start_time):
            client.set_tag(run.info.run_id, ORPHAN_TAG, f"process {tags[PID_TAG]} exited without ending the run")
            client.set_terminated(run.info.run_id, status="FAILED")
            orphans.append(run.info.run_id)
    if orphans:
        print(f"bertshrink: note: {len(orphans)} MLflow run(s) left RUNNING by a killed process marked FAILED.",
              file=sys.stderr)
    return orphans


@contextmanager
def stage_run(stage: str, registry: RegistryParams, parent_run_id: str | None = None) -> Iterator[str]:
    """A run for one stage, nested under the pipeline's parent run when there is one.

    The parent comes from the argument or ``BERTSHRINK_PARENT_RUN_ID``; a stage run alone (for
    example from ``dvc repro``) gets a top-level run. A failing stage ends its run FAILED.
    """
    experiment_id = configure_tracking(registry)
    parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    tags = {"bertshrink.stage": stage, "mlflow.source.git.commit": git_commit(),
            HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    else:  # a new pipeline, or a stage run alone: runs a killed process left behind end FAILED first
        fail_orphaned_runs(experiment_id)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


@contextmanager
def pipeline_run(registry: RegistryParams, run_name: str = "pipeline") -> Iterator[str]:
    """The parent run of one pipeline execution."""
    with stage_run(run_name, registry, parent_run_id=None) as run_id:
        MlflowClient().set_tag(run_id, "bertshrink.pipeline", "true")
        yield run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log ``key -> value`` params; values are stringified (MLflow caps them at 6,000 chars)."""
    client = MlflowClient()
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
        client.log_param(run_id, key, text[:6000])


def log_metrics(run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics``."""
    client = MlflowClient()
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        client.log_metric(run_id, key.replace("@", "_"), float(value), step=step or 0)


def log_history(run_id: str, history: list[dict[str, Any]]) -> None:
    """Per-step training curves from ``Trainer.state.log_history``."""
    for entry in history:
        step = int(entry.get("step", 0))
        log_metrics(run_id, {f"train.{k}": v for k, v in entry.items() if k not in ("step", "epoch")}, step=step)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:5000])


SHARED_SCHEMES = ("http", "https", "databricks")


def require_shared_tracking(who: str) -> None:
    """Workers on other machines must reach the same runs, registry and artifacts: a tracking server
    (``http(s)://``), not this machine's SQLite file and ``mlruns/`` folder."""
    scheme = tracking_uri().split(":", 1)[0].lower()
    if scheme not in SHARED_SCHEMES:
        raise ScaleOutError(
            f"{who} needs a shared MLflow tracking server, but MLFLOW_TRACKING_URI is {scheme}:..., which only this "
            "machine sees. Start one (`make services`) and set MLFLOW_TRACKING_URI=http://<host>:5000 here and "
            "on every worker.")
