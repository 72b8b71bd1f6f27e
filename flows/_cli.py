"""Command-line entry shared by the stage flows: parse params once, run, turn errors into exits."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn

import datasets

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import DEFAULT_PARAMS_FILE, Params, load_params
from bertshrink.errors import BertshrinkError, ParamsError, ServerUnavailableError
from flows._prefect_server import mark_servers_as_mine, require_prefect_server, stop_orphaned_servers
from tracking.runs import require_tracking_server, tracking_server_failure, without_credentials


def quiet_libraries() -> None:
    """Keep the console readable: library warnings that users can do nothing about go."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The machines this runs on are often offline; Prefect's telemetry would only time out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Progress bars for reading a few thousand rows are noise in front of the messages that matter.
    datasets.disable_progress_bars()
    # datasets prints its records with a handler of its own; through the root logger alone they
    # reach the run log, and the console filter keeps the errors our one message explains off.
    for handler in list(logging.getLogger("datasets").handlers):
        logging.getLogger("datasets").removeHandler(handler)
    # Our library's notices (resuming from a checkpoint, rows dropped) are for the user to see.
    logging.getLogger("bertshrink").setLevel(logging.INFO)
    for name in ("alembic", "mlflow.store.db.utils", "great_expectations"):
        logging.getLogger(name).setLevel(logging.WARNING)


def model_dir_option(verb: str) -> Callable:
    """``--model-dir`` (repeatable, default: the teacher) for stages that act on model folders."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model-dir", dest="model_dirs", action="append", default=None,
                            help=f"model folder to {verb} (repeatable; default: the teacher)")
    return add


def recipe_option(verb: str) -> Callable:
    """``--recipe`` (repeatable, default: every recipe in params) for stages that act on recipes."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--recipe", dest="recipes", action="append", default=None,
                            help=f"recipe to {verb} (repeatable; default: all in params.yaml compress.recipes)")
    return add


def selected_recipes(params: Params, names: list[str] | None) -> list[str]:
    """``names`` (default: every recipe), or a ``ParamsError`` naming the unknown ones."""
    unknown = [n for n in names or [] if n not in params.compress.recipes]
    if unknown:
        raise ParamsError(f"unknown recipe(s) {unknown}; params.yaml compress.recipes has: "
                          f"{', '.join(params.compress.recipes) or 'none'}")
    return list(names or params.compress.recipes)


def candidate_names(params: Params) -> list[str]:
    """Every recipe, then (with ``search.enabled``) the last search's front members: what compare,
    promote and report take as candidates."""
    members = Artifacts(params.base).search_members() if params.search.enabled else []
    return [*params.compress.recipes, *members]


def interrupted_message(params_file: str) -> str:
    """What an interruption left, truthfully: a checkpoint to resume from, or none yet."""
    try:
        checkpoints = sorted(Artifacts(load_params(params_file).base).checkpoints().rglob("checkpoint-*"),
                             key=lambda p: p.stat().st_mtime)
    except (BertshrinkError, OSError):
        checkpoints = []
    resume = (f"a rerun resumes training from {checkpoints[-1]}" if checkpoints else
              "no training checkpoint had been written yet, so a rerun starts that training over")
    return f"interrupted. Outputs already written are intact; {resume}."


def parse_args(description: str, argv: list[str] | None = None, extra: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow run to nest this stage's run under")
    add_debug_option(parser)
    if extra:
        extra(parser)
    return parser.parse_args(argv)


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="print tracebacks on the console too (they always go to the run log)")


class _NoTraceback(logging.Formatter):
    """The console's formatter, minus tracebacks: the message line of a record stays."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord(record.__dict__)
        plain.exc_info = plain.exc_text = plain.stack_info = None
        return without_credentials(self.inner.format(plain))


class _WithoutCredentials(logging.Formatter):
    """The run log's formatter: a URL's ``user:password@`` never reaches the file (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        return without_credentials(super().format(record))


def _not_a_failure_report(record: logging.LogRecord) -> bool:
    """False for Prefect's reports of a failed task or flow run, which repeat (with tracebacks,
    once per level of nesting) the error that the one ``bertshrink:`` line states at the end, and
    for datasets' own "Failed to read file" errors, which our message explains."""
    if record.name.startswith("datasets") and record.levelno >= logging.ERROR:
        return False
    if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
        return record.levelno < logging.ERROR and not record.getMessage().startswith("Finished in state Failed")
    return not record.getMessage().startswith("Stopping temporary server")


def start_run_log(log_file: Path, debug: bool = False) -> Path | None:
    """Everything logged goes to ``log_file`` with tracebacks; the console keeps the progress lines
    but not the failure reports and tracebacks (with ``debug``, it keeps those too).

    Returns the log file, or None where it cannot be written (the console then is all there is).
    """
    root = logging.getLogger()
    if not debug:
        for handler in root.handlers:  # Prefect's console handler, set up when prefect was imported
            handler.addFilter(_not_a_failure_report)
            handler.setFormatter(_NoTraceback(handler.formatter))
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=20_000_000, backupCount=1)
    except OSError:
        return None
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(_WithoutCredentials("%(asctime)s %(levelname)-7s %(name)s - %(message)s"))
    root.addHandler(file_handler)
    _to_log_file(f"---- {' '.join(sys.argv)} (pid {os.getpid()})")
    return log_file


def _to_log_file(message: str, err: BaseException | None = None) -> None:
    """A line (and ``err``'s traceback) into the run log alone: the console has its one line."""
    exc_info = (type(err), err, err.__traceback__) if err is not None else None
    record = logging.LogRecord(__name__, logging.ERROR if err else logging.INFO, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(message: str, exit_code: int, err: BaseException | None = None, log_file: Path | None = None,
         debug: bool = False) -> NoReturn:
    """End the process with one ``bertshrink:`` line; the traceback goes to the log (or here with --debug)."""
    if err is not None:
        _to_log_file(f"failed: {message}", err)
        if debug:
            traceback.print_exception(err, file=sys.stderr)
    print(f"\nbertshrink: {without_credentials(message)}", file=sys.stderr)
    if err is not None and log_file is not None and not debug:
        print(f"bertshrink: the traceback is in {log_file} (or rerun with --debug).", file=sys.stderr)
    sys.exit(exit_code)


def run_cli(work: Callable[[Params], object], params_file: str, debug: bool = False) -> None:
    """Load params (fail fast), clear what killed runs left, run ``work(params)``; every failure
    ends in one ``bertshrink:`` line and a non-zero exit, its traceback in the run log."""
    quiet_libraries()
    log_file = None
    try:
        params = load_params(params_file)
        log_file = start_run_log(Artifacts(params.base).run_log, debug)
        require_tracking_server()  # before any work: an unreachable server fails the run now
        require_prefect_server()
        stop_orphaned_servers()
        mark_servers_as_mine()
        work(params)
    except (ParamsError, ServerUnavailableError) as err:  # the setting and the fix are the whole story
        fail(f"{type(err).__name__}: {err}", err.exit_code, debug=debug)
    except BertshrinkError as err:
        fail(f"{type(err).__name__}: {err}", err.exit_code, err, log_file, debug)
    except KeyboardInterrupt:
        fail(interrupted_message(params_file), 130)
    except Exception as err:  # a bug, or a case not handled yet: still one line, and the traceback kept
        server = tracking_server_failure(err)
        if server:
            fail(f"{type(server).__name__}: {server}", server.exit_code, err, log_file, debug)
        fail(f"unexpected {type(err).__name__}: {str(err).rstrip('.')}. This is a bug or a case bertshrink "
             "does not handle yet; please report it with the log named below.", 1, err, log_file, debug)


def run_stage(flow_fn: Callable, description: str, argv: list[str] | None = None, extra: Callable | None = None,
              cli_args: tuple[str, ...] = ()) -> None:
    """``python -m flows.<stage>``: load params (fail fast), run the flow, exit non-zero on error.

    ``extra`` adds stage-specific options to the parser; ``cli_args`` names those passed to the flow.
    """
    args = parse_args(description, argv, extra)
    extra_kwargs = {name: getattr(args, name) for name in cli_args}
    run_cli(lambda params: flow_fn(params=params, parent_run_id=args.parent_run_id, **extra_kwargs),
            args.params, args.debug)
