"""Scored trials -> the Pareto front, the flagged front, and which proxy trials earn the full budget.

Objectives: validation accuracy (higher is better), batch-1 forward p50 and size on disk (lower is
better). Constraints are relative margins, ``<= 0`` met (Optuna's convention), so a violation reads
the same whatever its unit: 0.02 is 2% past the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bertshrink.config.knobs import PromotionConstraints

OBJECTIVES = ("accuracy", "p50_ms", "size_mb")
DIRECTIONS = ("maximize", "minimize", "minimize")


@dataclass(frozen=True)
class Scored:
    """One finished trial as the front sees it."""

    number: int
    accuracy: float
    p50_ms: float
    size_mb: float
    constraints: dict[str, float] = field(default_factory=dict)   # name -> relative margin, <= 0 met

    @property
    def costs(self) -> tuple[float, float, float]:
        """The objectives, all to minimise."""
        return -self.accuracy, self.p50_ms, self.size_mb

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    @property
    def violation(self) -> float:
        """Sum of the relative amounts by which constraints are broken (0 when all are met)."""
        return sum(max(0.0, v) for v in self.constraints.values())


@dataclass(frozen=True)
class Front:
    """The members to register, best spread first, and whether they meet the constraints."""

    members: tuple[Scored, ...]
    constraints_met: bool
    reason: str


def constraint_margins(scores: dict, constraints: PromotionConstraints) -> dict[str, float]:
    """The registry rule's limits as relative margins (``<= 0`` met); only the limits that are set.

    ``scores`` has ``retention`` (and its interval's ``retention_low``) and ``agreement`` (validation
    split, against the teacher), ``p95_ms`` (batch 1) and ``size_mb``.
    """
    retention = constraints.judged_retention(scores.get("retention"), scores.get("retention_low"))
    checks = (("min_retention", retention, constraints.min_retention, -1.0),
              ("min_agreement", scores.get("agreement"), constraints.min_agreement, -1.0),
              ("max_p95_ms", scores.get("p95_ms"), constraints.max_p95_ms, 1.0),
              ("max_size_mb", scores.get("size_mb"), constraints.max_size_mb, 1.0))
    margins = {}
    for name, value, limit, sign in checks:
        if limit is None:
            continue
        if value is None or not math.isfinite(value):
            margins[name] = 1.0   # not measured: as broken as a model can be
        else:
            margins[name] = sign * (value - limit) / (abs(limit) or 1.0)
    return margins


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (all objectives minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def nondominated_ranks(items: Sequence[Scored]) -> list[int]:
    """0 for the Pareto front, 1 for the front once that is removed, and so on (NSGA-II's sorting)."""
    ranks = [-1] * len(items)
    left, rank = set(range(len(items))), 0
    while left:
        layer = {i for i in left if not any(dominates(items[j].costs, items[i].costs) for j in left if j != i)}
        for i in layer:
            ranks[i] = rank
        left -= layer
        rank += 1
    return ranks


def pareto(items: Sequence[Scored]) -> list[Scored]:
    """The non-dominated items, fastest first."""
    ranks = nondominated_ranks(items)
    return sorted((s for s, r in zip(items, ranks) if r == 0), key=lambda s: (s.p50_ms, s.size_mb, -s.accuracy))


def spread(items: Sequence[Scored], k: int) -> list[Scored]:
    """At most ``k`` of ``items`` (sorted fastest first), evenly spaced: the fastest and the most
    accurate ends stay."""
    items = list(items)
    if len(items) <= k:
        return items
    if k == 1:
        return [max(items, key=lambda s: (s.accuracy, -s.p50_ms))]
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def select_front(items: Sequence[Scored], max_size: int) -> Front:
    """The Pareto front of the trials that meet the constraints; if none does, the least-violating
    trials, flagged ``constraints_met=False``: never an empty front while a trial finished."""
    if not items:
        return Front((), False, "no trial finished")
    feasible = [s for s in items if s.feasible]
    if feasible:
        front = pareto(feasible)
        return Front(tuple(spread(front, max_size)), True,
                     f"{len(front)} non-dominated of {len(feasible)} trials meeting the constraints")
    least = sorted(items, key=lambda s: (s.violation, -s.accuracy, s.p50_ms, s.number))[:max_size]
    return Front(tuple(least), False,
                 f"no trial of {len(items)} met the constraints; the {len(least)} least violating "
                 f"(violation {least[0].violation:.3g} and up) are kept, flagged")


def promote_for_full(items: Sequence[Scored], eta: int, max_full: int) -> list[Scored]:
    """Successive halving: the best ``ceil(n / eta)`` proxy trials (at most ``max_full``, at least
    one). Trials that meet the constraints come first, then the rest by least violation; within
    each, by non-dominated rank, and a rank with more trials than places left gives a spread of it
    (fastest to most accurate), not only its most accurate."""
    keep = max(1, min(max_full, math.ceil(len(items) / eta))) if items else 0
    feasible = [s for s in items if s.feasible]
    infeasible = sorted((s for s in items if not s.feasible), key=lambda s: (s.violation, -s.accuracy))
    chosen: list[Scored] = []
    ranks = nondominated_ranks(feasible)
    for rank in sorted(set(ranks)):
        layer = sorted((s for s, r in zip(feasible, ranks) if r == rank), key=lambda s: (s.p50_ms, s.size_mb))
        chosen += spread(layer, keep - len(chosen))
        if len(chosen) >= keep:
            break
    return (chosen + infeasible)[:keep]
