"""Beyond accuracy: how a candidate behaves next to its teacher.

Agreement (fidelity) with the teacher's predictions, accuracy per class and per input-length
bucket, the examples where the two disagree, and the spread of a recipe's accuracy over seeds.
Pure functions on label / prediction arrays; no tracking code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

LENGTH_BUCKETS = 3  # short / medium / long, by word count quantiles of the evaluated split
RETENTION_CONFIDENCE = 0.95  # two-sided level of the retention interval
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same predictions always give the same interval


def agreement(predictions: Sequence[int], teacher_predictions: Sequence[int]) -> float:
    """Share of examples on which the candidate predicts what the teacher predicts."""
    ours, theirs = np.asarray(predictions, dtype=int), np.asarray(teacher_predictions, dtype=int)
    if ours.shape != theirs.shape:
        raise ValueError(f"{len(ours)} predictions but {len(theirs)} teacher predictions: "
                         "were they made on the same split? Re-evaluate the teacher.")
    return float(np.mean(ours == theirs)) if len(ours) else float("nan")


def metric_key(name: str) -> str:
    """A class or bucket name as an MLflow-safe metric key part (letters, digits, _ - .)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def accuracy_by_class(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str]) -> dict:
    """Per true class: accuracy (the class's recall) and its number of examples."""
    y, p = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    out = {}
    for index, name in enumerate(label_names):
        mask = y == index
        out[metric_key(name)] = {"accuracy": float(np.mean(p[mask] == index)) if mask.any() else float("nan"),
                                 "n": int(mask.sum())}
    return out


def word_counts(texts: Sequence[str]) -> np.ndarray:
    """Whitespace words per text: a tokenizer-independent length, the same for every candidate."""
    return np.array([len(str(t).split()) for t in texts], dtype=int)


def length_bucket_edges(texts: Sequence[str], buckets: int = LENGTH_BUCKETS) -> list[int]:
    """Upper word-count bounds of all buckets but the last (quantiles of ``texts``, deduplicated)."""
    counts = word_counts(texts)
    if len(counts) == 0:
        return []
    quantiles = np.quantile(counts, [i / buckets for i in range(1, buckets)], method="lower")  # real counts
    return sorted({int(q) for q in quantiles})


def bucket_names(edges: Sequence[int]) -> list[str]:
    """MLflow-safe names, e.g. ``words_1-12``, ``words_13-24``, ``words_25-up``."""
    names, low = [], 1
    for high in edges:
        names.append(f"words_{low}-{high}")
        low = high + 1
    names.append(f"words_{low}-up")
    return names


def accuracy_by_length(texts: Sequence[str], labels: Sequence[int], predictions: Sequence[int],
                       edges: Sequence[int]) -> dict:
    """Accuracy and count per word-count bucket (bounds from ``length_bucket_edges``)."""
    counts = word_counts(texts)
    y, p = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    bucket = np.searchsorted(np.asarray(edges), counts, side="left")  # count <= edge -> that bucket
    out = {}
    for index, name in enumerate(bucket_names(edges)):
        mask = bucket == index
        out[name] = {"accuracy": float(np.mean(p[mask] == y[mask])) if mask.any() else float("nan"),
                     "n": int(mask.sum())}
    return out


def disagreement_table(texts: Sequence[str], labels: Sequence[int], predictions: Sequence[int],
                       teacher_predictions: Sequence[int], label_names: Sequence[str],
                       limit: int | None = None) -> pd.DataFrame:
    """The examples where candidate and teacher disagree: text, true label, both predictions, who was right."""
    y, p, t = (np.asarray(a, dtype=int) for a in (labels, predictions, teacher_predictions))
    rows = np.flatnonzero(p != t)
    if limit is not None:
        rows = rows[:limit]

    def name(i: int) -> str:
        return label_names[i] if 0 <= i < len(label_names) else str(i)

    return pd.DataFrame({
        "row": rows,
        "text": [str(texts[i]) for i in rows],
        "label": [name(y[i]) for i in rows],
        "teacher": [name(t[i]) for i in rows],
        "candidate": [name(p[i]) for i in rows],
        "right": ["candidate" if p[i] == y[i] else "teacher" if t[i] == y[i] else "neither" for i in rows],
    })


def behaviour_report(texts: Sequence[str], labels: Sequence[int], predictions: Sequence[int],
                     label_names: Sequence[str], teacher_predictions: Sequence[int] | None = None,
                     teacher_accuracy: float | None = None) -> dict:
    """Per-class and per-length accuracy; agreement and retention when the teacher's figures are given."""
    report = {
        "by_class": accuracy_by_class(labels, predictions, label_names),
        "by_length": accuracy_by_length(texts, labels, predictions, length_bucket_edges(texts)),
    }
    report.update(fidelity(labels, predictions, teacher_predictions, teacher_accuracy))
    report.pop("accuracy")
    return report


def fidelity(labels: Sequence[int], predictions: Sequence[int], teacher_predictions: Sequence[int] | None = None,
             teacher_accuracy: float | None = None) -> dict:
    """Accuracy; agreement and disagreements with the teacher's predictions, and retention (accuracy /
    the teacher's), when those are given; with both, retention's paired 95% interval
    (``retention_low``, ``retention_high``)."""
    ours = np.asarray(predictions, dtype=int)
    accuracy = float(np.mean(ours == np.asarray(labels, dtype=int))) if len(ours) else float("nan")
    figures: dict = {"accuracy": accuracy}
    if teacher_predictions is not None:
        figures["agreement"] = agreement(predictions, teacher_predictions)
        figures["disagreements"] = int(np.sum(ours != np.asarray(teacher_predictions, dtype=int)))
    if teacher_accuracy:
        figures["retention"] = accuracy / teacher_accuracy
        if teacher_predictions is not None and len(ours):
            low, high = retention_interval(labels, predictions, teacher_predictions)
            figures["retention_low"], figures["retention_high"] = low, high
    return figures


def paired_outcomes(labels: Sequence[int], predictions: Sequence[int], teacher_predictions: Sequence[int]) -> dict:
    """How many examples both got right, only the candidate, only the teacher, neither."""
    y, ours, theirs = (np.asarray(a, dtype=int) for a in (labels, predictions, teacher_predictions))
    if not (len(y) == len(ours) == len(theirs)):
        raise ValueError(f"{len(y)} labels, {len(ours)} predictions and {len(theirs)} teacher predictions: "
                         "were they made on the same split? Re-evaluate the teacher.")
    mine, teachers = ours == y, theirs == y
    return {"both": int(np.sum(mine & teachers)), "candidate_only": int(np.sum(mine & ~teachers)),
            "teacher_only": int(np.sum(~mine & teachers)), "neither": int(np.sum(~mine & ~teachers))}


def retention_interval(labels: Sequence[int], predictions: Sequence[int], teacher_predictions: Sequence[int],
                       confidence: float = RETENTION_CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Paired bootstrap percentile interval of retention (accuracy / the teacher's accuracy).

    Paired: each resample draws examples, with both models' outcomes on them, so the shared
    difficulty of a split cancels and only the examples where the two differ widen the interval.
    Resampling rows is the same as drawing the four outcome counts (both right, candidate only,
    teacher only, neither) from a multinomial, which is exact and needs no n x resamples matrix.
    """
    counts = paired_outcomes(labels, predictions, teacher_predictions)
    n = sum(counts.values())
    if n == 0:
        return float("nan"), float("nan")
    shares = np.array([counts["both"], counts["candidate_only"], counts["teacher_only"], counts["neither"]]) / n
    draws = np.random.default_rng(seed).multinomial(n, shares, size=resamples)
    teacher_right = draws[:, 0] + draws[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (draws[:, 0] + draws[:, 1]) / teacher_right
    ratios = ratios[teacher_right > 0]
    if ratios.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, min, max and n of a metric over seeds (std 0 for one value)."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "n": int(array.size)}
