"""Command-line entry shared by the stage flows: parse params once, run, turn errors into exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import DEFAULT_PARAMS_FILE, Params, load_params
from bertshrink.errors import BertshrinkError, ParamsError


def quiet_libraries() -> None:
    """Keep the console readable: library warnings that users can do nothing about go."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The machines this runs on are often offline; Prefect's telemetry would only time out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
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
    if extra:
        extra(parser)
    return parser.parse_args(argv)


def run_stage(flow_fn: Callable, description: str, argv: list[str] | None = None, extra: Callable | None = None,
              cli_args: tuple[str, ...] = ()) -> None:
    """``python -m flows.<stage>``: load params (fail fast), run the flow, exit non-zero on error.

    ``extra`` adds stage-specific options to the parser; ``cli_args`` names those passed to the flow.
    """
    quiet_libraries()
    args = parse_args(description, argv, extra)
    try:
        params: Params = load_params(args.params)
        extra_kwargs = {name: getattr(args, name) for name in cli_args}
        flow_fn(params=params, parent_run_id=args.parent_run_id, **extra_kwargs)
    except BertshrinkError as err:
        print(f"\nbertshrink: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(f"\nbertshrink: {interrupted_message(args.params)}", file=sys.stderr)
        sys.exit(130)
