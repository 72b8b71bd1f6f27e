"""Rules that decide what happens to a measured candidate (no tracking code here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bertshrink.config.recipes import REPORTED_SPLIT, SELECTION_SPLIT


def split_accuracy(result: Mapping[str, Any], split: str) -> float | None:
    """The accuracy on ``split`` in an ``evaluate_model`` result, or None where it is missing."""
    value = ((result.get("metrics") or {}).get(split) or {}).get("accuracy") if isinstance(result, Mapping) else None
    return None if value is None else float(value)


def reported_accuracy(result: Mapping[str, Any]) -> float | None:
    """The test accuracy: what reports show, never what a rule chooses on."""
    return split_accuracy(result, REPORTED_SPLIT)


def selection_accuracy(result: Mapping[str, Any]) -> float | None:
    """The validation accuracy: what the collapse guard and the promotion rule judge."""
    return split_accuracy(result, SELECTION_SPLIT)


def collapse_reason(candidate: Mapping[str, Any], teacher: Mapping[str, Any], max_drop: float) -> str | None:
    """Why ``candidate`` counts as collapsed (validation accuracy more than ``max_drop`` below the
    teacher's), or None.

    A collapsed model (typically a quantization gone wrong) is kept for inspection but must never
    become a promotion candidate. Judged on the validation split, like promotion: the test split
    only reports.
    """
    ours, theirs = selection_accuracy(candidate), selection_accuracy(teacher)
    if ours is None or theirs is None:
        return None
    if ours != ours:  # NaN: nothing was scored
        return f"{SELECTION_SPLIT} accuracy is NaN"
    drop = theirs - ours
    if drop > max_drop:
        return (f"{SELECTION_SPLIT} accuracy {ours:.4f} is {drop:.4f} below the teacher's {theirs:.4f} "
                f"(compress.max_accuracy_drop = {max_drop})")
    return None


def stale_reason(result: Mapping[str, Any], model_fingerprint: str, data_hash: str | None) -> str | None:
    """Why an evaluation result does not describe the model now in its folder (trained on ``data_hash``),
    or None when it does: registering or promoting on it would attach another model's figures."""
    measured = result.get("model_fingerprint")
    if measured is None:
        return "it records no model fingerprint (written before fingerprints were recorded)"
    if measured != model_fingerprint:
        return f"it measured model {measured[:12]}, but the folder now holds model {model_fingerprint[:12]}"
    if data_hash is not None and result.get("data_content_hash") != data_hash:
        return (f"it was measured on data {str(result.get('data_content_hash'))[:12]}, but the model was trained "
                f"on data {data_hash[:12]}")
    return None
