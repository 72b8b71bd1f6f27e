"""The command line: one message first and alone, tracebacks in the run log, and what a killed run
left behind (Prefect's temporary server) stopped at the next start. Issue 13, rows 5 and 7."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows._cli import run_cli, start_run_log
from conftest import run_module
from flows._prefect_server import OWNER_ENV, SERVER_APP, orphaned_servers, stop_orphaned_servers

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture
def console(monkeypatch) -> io.StringIO:
    """The root logger with one console handler writing to a buffer, as Prefect sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s - %(message)s"))
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    return stream


def _traceback_record(name: str, message: str) -> logging.LogRecord:
    try:
        raise ValueError("boom")
    except ValueError:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, sys.exc_info())


def test_the_console_keeps_progress_but_not_failure_reports_or_tracebacks(tmp_path, console):
    log_file = start_run_log(tmp_path / "logs" / "run.log")
    root = logging.getLogger()
    try:
        root.handle(logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, "Beginning flow run", None, None))
        root.handle(_traceback_record("prefect.task_runs", "Task run failed with exception: boom - Retries are exhausted"))
        root.handle(logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1,
                                      "Finished in state Failed('Task run encountered an exception')", None, None))
        root.handle(logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1,
                                      "Finished in state Failed('Flow run encountered an exception')", None, None))
        root.handle(logging.LogRecord("datasets.packaged_modules.csv.csv", logging.ERROR, __file__, 1,
                                      "Failed to read file 'x.tsv' with error ParserError", None, None))
        root.handle(_traceback_record("mlflow.store", "could not log a metric"))
    finally:
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    shown = console.getvalue().splitlines()
    assert shown == ["INFO prefect.flow_runs - Beginning flow run", "ERROR mlflow.store - could not log a metric"]
    kept = log_file.read_text()
    assert kept.count("Traceback (most recent call last)") == 2 and "Retries are exhausted" in kept
    assert "Finished in state Failed('Flow run encountered an exception')" in kept and "Failed to read file" in kept


@pytest.mark.parametrize("raised, code, first_line", [
    (ValueError("With n_samples=1, the train set will be empty."), 1,
     "bertshrink: unexpected ValueError: With n_samples=1, the train set will be empty. This is a bug"),
    (KeyboardInterrupt(), 130, "bertshrink: interrupted. Outputs already written are intact;"),
])
def test_any_failure_ends_in_one_line_and_its_exit_code(tmp_path, console, monkeypatch, capsys, raised, code,
                                                         first_line):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("base:\n  reports_dir: out\n")

    def work(params):
        raise raised

    root_handlers = list(logging.getLogger().handlers)
    with pytest.raises(SystemExit) as exit_:
        run_cli(work, "params.yaml")
    for handler in set(logging.getLogger().handlers) - set(root_handlers):
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert err.lstrip().startswith(first_line) and "Traceback" not in err
    if code == 1:  # the traceback is kept for a report
        assert "the traceback is in out/logs/bertshrink.log" in err
        assert "Traceback (most recent call last)" in (tmp_path / "out" / "logs" / "bertshrink.log").read_text()


@pytest.mark.slow
def test_a_bad_input_prints_one_message_first_and_alone_and_logs_the_traceback(tmp_path):
    """Through Prefect, as a user runs it: no traceback and no failure report before the message,
    no torch/torchao import noise; the traceback is in reports/logs; --debug prints it."""
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "params.yaml").write_text(f"data:\n  source: {tmp_path / 'empty.csv'}\n")
    done = run_module(["-m", "flows.prepare"], tmp_path)
    assert done.returncode == 3, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or line.startswith("bertshrink:")]
    assert errors[0].startswith("bertshrink: DataSourceError: ") and "no rows" in errors[0], done.stderr
    assert errors[1:] == ["bertshrink: the traceback is in reports/logs/bertshrink.log (or rerun with --debug)."]
    assert "Traceback" not in done.stderr and "torchao" not in done.stderr and "WARNING" not in done.stderr
    log = (tmp_path / "reports" / "logs" / "bertshrink.log").read_text()
    assert "Traceback (most recent call last)" in log and "DataSourceError" in log

    debug = run_module(["-m", "flows.prepare", "--debug"], tmp_path)
    assert debug.returncode == 3 and "Traceback (most recent call last)" in debug.stderr
    # the message still comes after every traceback, where the eye lands
    assert debug.stderr.rindex("bertshrink: DataSourceError: ") > debug.stderr.rindex("Traceback")


def _server_of(owner: psutil.Process, timeout: float = 120) -> psutil.Process:
    """The temporary Prefect server ``owner`` started (waits for it to answer)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in owner.children(recursive=True):
            try:
                if SERVER_APP in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    raise AssertionError("the flow process started no temporary Prefect server")


@pytest.mark.slow
def test_a_killed_runs_temporary_prefect_server_is_stopped_at_the_next_start(tmp_path):
    """A real flow process starts Prefect's temporary server, then is SIGKILLed mid-flow: while
    it runs its server is left alone; once it is dead, the next start stops the server."""
    script = ("from flows._prefect_server import mark_servers_as_mine\n"
              "from prefect import flow\n"
              "import time\n"
              "mark_servers_as_mine()\n"
              "@flow\n"
              "def wait():\n"
              "    print('running', flush=True)\n"
              "    time.sleep(300)\n"
              "wait()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.pop(OWNER_ENV, None)
    run = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        assert run.stdout.readline().strip() == "running"  # the flow runs, so its server is up
        server = _server_of(psutil.Process(run.pid))
        assert server.pid not in [p.pid for p in orphaned_servers()]  # its owner still runs
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        assert server.is_running()  # what a kill leaves: the server runs on
        assert stop_orphaned_servers() == [server.pid]
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    finally:
        run.kill()
        for child in psutil.Process().children(recursive=True):
            if SERVER_APP in " ".join(child.cmdline()):
                child.kill()
