"""Rules that decide what happens to a measured candidate (no tracking code here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ACCURACY_KEY = ("metrics", "test", "accuracy")


def reported_accuracy(result: Mapping[str, Any]) -> float | None:
    """The test accuracy in an ``evaluate_model`` result, or None where it is missing."""
    value: Any = result
    for key in ACCURACY_KEY:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return float(value)


def collapse_reason(candidate: Mapping[str, Any], teacher: Mapping[str, Any], max_drop: float) -> str | None:
    """Why ``candidate`` counts as collapsed (test accuracy more than ``max_drop`` below the teacher's), or None.

    A collapsed model (typically a quantization gone wrong) is kept for inspection but must never
    become a promotion candidate.
    """
    ours, theirs = reported_accuracy(candidate), reported_accuracy(teacher)
    if ours is None or theirs is None:
        return None
    if ours != ours:  # NaN: nothing was scored
        return "test accuracy is NaN"
    drop = theirs - ours
    if drop > max_drop:
        return (f"test accuracy {ours:.4f} is {drop:.4f} below the teacher's {theirs:.4f} "
                f"(compress.max_accuracy_drop = {max_drop})")
    return None
