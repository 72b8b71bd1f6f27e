"""MLflow runs a killed process left RUNNING are marked FAILED at the next start (issue 13, row 5)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlflow.tracking import MlflowClient

from bertshrink.config.params import RegistryParams
from tracking.runs import HOST_TAG, ORPHAN_TAG, PID_TAG, configure_tracking, fail_orphaned_runs, stage_run


def test_runs_of_a_killed_process_end_failed_and_live_or_foreign_ones_are_left(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = configure_tracking(RegistryParams(experiment="orphans"))
    client = MlflowClient()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    here = socket.gethostname()
    owners = {"killed": (here, dead.stdout.strip()), "alive": (here, str(os.getpid())),
              "elsewhere": ("another-host", dead.stdout.strip())}
    runs = {name: client.create_run(experiment, run_name=name, tags={HOST_TAG: host, PID_TAG: pid}).info.run_id
            for name, (host, pid) in owners.items()}
    assert fail_orphaned_runs(experiment) == [runs["killed"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"killed": "FAILED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert client.get_run(runs["killed"]).data.tags[ORPHAN_TAG].endswith("exited without ending the run")
    assert "1 MLflow run(s) left RUNNING by a killed process marked FAILED" in capsys.readouterr().err
    # a new stage run (no parent) does the same clean-up on its own, and records its owner
    client.set_tag(runs["alive"], PID_TAG, dead.stdout.strip())
    with stage_run("prepare", RegistryParams(experiment="orphans")) as run_id:
        assert client.get_run(runs["alive"]).info.status == "FAILED"
        assert client.get_run(run_id).data.tags[PID_TAG] == str(os.getpid())
