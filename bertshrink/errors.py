"""Errors a user can act on. Each carries an exit code and a message naming the fix."""

from __future__ import annotations


class BertshrinkError(Exception):
    """Base class: ``str(err)`` is shown to the user as is, then the process exits non-zero.

    ``transient`` says whether trying again later can help (a network hiccup); a missing file,
    a wrong column or an unreachable network does not go away by retrying within seconds.
    """

    exit_code = 1
    transient = False


class ParamsError(BertshrinkError):
    """params.yaml is missing, malformed, or has an unknown key / wrong type / bad range."""

    exit_code = 2


class DataSourceError(BertshrinkError):
    """A data source cannot be resolved, read, or lacks the named columns."""

    exit_code = 3


class ModelSourceError(BertshrinkError):
    """A model source cannot be resolved: missing folder, unreachable Hub, bad files."""

    exit_code = 4


class DataValidationError(BertshrinkError):
    """The Great Expectations suite failed on the prepared data."""

    exit_code = 5


class TrainingError(BertshrinkError):
    """Training diverged (NaN/inf loss) or could not run."""

    exit_code = 6


class MissingArtifactError(BertshrinkError):
    """A stage needs the output of an earlier stage that is not there."""

    exit_code = 7


class CompressionError(BertshrinkError):
    """One or more compression recipes failed (the others still ran)."""

    exit_code = 8


class OutputError(BertshrinkError):
    """A folder a stage writes to cannot be written (permissions, read-only disk, a file in the way)."""

    exit_code = 9


class ServerUnavailableError(BertshrinkError):
    """A server the run needs (the MLflow tracking server, the Prefect API) cannot be reached or keeps failing."""

    exit_code = 10


class QuantizationError(CompressionError, ValueError):
    """A quantization setting is out of range, or cannot be applied to this model or machine."""


def is_network_error(err: BaseException) -> bool:
    """Connection resets and time-outs, whichever HTTP library raised them."""
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        word in type(err).__name__ for word in ("Timeout", "Connect"))


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` can help: our errors say so; of the others, only a dropped
    connection or a time-out (a tracking server's hiccup). A bug fails the same way again."""
    if isinstance(err, BertshrinkError):
        return err.transient
    return is_network_error(err)


def retry_only_transient(task, task_run, state) -> bool:
    """A ``retry_condition_fn`` for the tasks layer's Prefect tasks (called as ``(task, task_run,
    state)``; a failed state's ``data`` is the exception): retry only where it can help."""
    return is_transient(state.data)


class ScaleOutError(BertshrinkError):
    """Recipes cannot spread over workers as configured: no shared tracking server, no recipe
    deployment or work pool, no registered teacher. (A recipe whose flow run crashed is a failed
    recipe, exit 8, like one that failed in this process.)"""

    exit_code = 11
