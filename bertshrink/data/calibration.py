"""Choose the texts that calibrate static quantization, never from the data we evaluate on.

Calibration sets activation ranges from real inputs; texts that are also scored afterwards
would make the quantized model look better than it is. ``select_calibration`` draws a seeded
sample from a training split, refuses evaluation splits and any overlap with them, and returns
provenance (row ids and a hash) so a result can say exactly which texts calibrated it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pandas as pd

from bertshrink.config.recipes import EVALUATION_SPLITS, MIN_CALIBRATION_ROWS
from bertshrink.data.prepare import normalize_text
from bertshrink.errors import ParamsError


class CalibrationError(ParamsError):
    """The calibration settings cannot give a sound calibration set (exit code 2)."""


def _check_split(splits: Mapping[str, pd.DataFrame], split: str, eval_splits: Sequence[str]) -> None:
    if split in eval_splits:
        raise CalibrationError(
            f"Calibration split {split!r} is an evaluation split ({list(eval_splits)}): calibrating "
            "on texts that are scored later inflates the quantized model's accuracy. Use 'train'."
        )
    if split not in splits:
        raise CalibrationError(
            f"Calibration split {split!r} is not in the prepared data (splits: {sorted(splits)}). "
            "Set the calibration split to one of those that is not evaluated, e.g. 'train'."
        )


def _check_rows(split: str, available: int, rows: int, min_rows: int) -> int:
    """How many rows to draw: ``rows``, or all of the split when it is smaller but big enough."""
    if rows < min_rows:
        raise CalibrationError(
            f"Calibration asks for {rows} rows; at least {min_rows} are needed for stable "
            f"activation ranges. Raise the calibration row count to >= {min_rows}."
        )
    if available < min_rows:
        raise CalibrationError(
            f"Split {split!r} has only {available} rows; calibration needs at least {min_rows}. "
            "Use a bigger split or lower min_rows."
        )
    return min(rows, available)


def _leaked(texts: Sequence[str], splits: Mapping[str, pd.DataFrame],
            eval_splits: Sequence[str]) -> list[str]:
    """The chosen texts whose normalized form also occurs in an evaluation split."""
    evaluated = {normalize_text(t) for name in eval_splits if name in splits
                 for t in splits[name]["text"].astype(str)}
    return [t for t in texts if normalize_text(t) in evaluated]


def calibration_hash(row_ids: Sequence, texts: Sequence[str]) -> str:
    """sha256 over (row id, text) pairs in order: the identity of a calibration set."""
    digest = hashlib.sha256()
    for row_id, text in zip(row_ids, texts):
        digest.update(f"{row_id}\x1f".encode())
        digest.update(str(text).encode("utf-8", "replace"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def select_calibration(splits: dict[str, pd.DataFrame], split: str, rows: int, seed: int, *,
                       min_rows: int = MIN_CALIBRATION_ROWS,
                       eval_splits: Sequence[str] = EVALUATION_SPLITS) -> tuple[list[str], dict]:
    """A seeded sample of ``rows`` texts from ``splits[split]`` and its provenance.

    Takes the whole split when it has fewer than ``rows`` (but at least ``min_rows``) rows.
    Raises ``CalibrationError`` for an evaluation or missing split, too few rows, or chosen
    texts that also appear (after ``normalize_text``) in an evaluation split.
    Provenance: ``{split, rows, seed, row_ids, sha256}``; row ids are the frame's index values.
    """
    chosen, provenance = select_rows(splits, split, rows, seed, min_rows=min_rows, eval_splits=eval_splits)
    return chosen["text"].astype(str).tolist(), provenance


def select_rows(splits: dict[str, pd.DataFrame], split: str, rows: int, seed: int, *,
                min_rows: int = MIN_CALIBRATION_ROWS,
                eval_splits: Sequence[str] = EVALUATION_SPLITS) -> tuple[pd.DataFrame, dict]:
    """``select_calibration``'s rows as a frame (texts with their labels) and their provenance."""
    _check_split(splits, split, eval_splits)
    frame = splits[split]
    n = _check_rows(split, len(frame), int(rows), min_rows)
    chosen = frame.sample(n=n, random_state=seed) if n < len(frame) else frame
    texts = chosen["text"].astype(str).tolist()
    leaked = _leaked(texts, splits, eval_splits)
    if leaked:
        raise CalibrationError(
            f"{len(leaked)} of {n} calibration texts from split {split!r} also appear in "
            f"evaluation splits {list(eval_splits)}, e.g. {leaked[0][:80]!r}. Re-run the data "
            "stage with deduplication across splits, or calibrate on another split."
        )
    row_ids = [_plain(i) for i in chosen.index]
    return chosen, {"split": split, "rows": n, "seed": int(seed), "row_ids": row_ids,
                    "sha256": calibration_hash(row_ids, texts)}


def _plain(value):
    """numpy scalars to Python ones, so the provenance is JSON-able."""
    return value.item() if hasattr(value, "item") else value
