"""Errors a user can act on. Each carries an exit code and a message naming the fix."""

from __future__ import annotations


class BertshrinkError(Exception):
    """Base class: ``str(err)`` is shown to the user as is, then the process exits non-zero."""

    exit_code = 1


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


class QuantizationError(CompressionError, ValueError):
    """A quantization setting is out of range, or cannot be applied to this model or machine."""
