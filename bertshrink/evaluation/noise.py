"""The noise guard of the interleaved comparison: was the machine calm while it timed?

Three signs of contamination, each a reason in words (``noise_reasons``, a pure function):
- other processes used CPU time the timing threads needed: cores busy elsewhere (the busy CPU
  time of the usable cores, minus this process's own, per wall second) + the timing threads
  exceed the usable cores by more than ``load_tolerance_cores``;
- a model's speed ratio to the reference moved between rounds (the same batches, timed again)
  by more than ``ratio_tolerance`` ((max - min) / median);
- a model's p95 is more than ``max_tail_ratio`` times its p50 (seen on a busy machine: teacher
  batch-1 p95 870 ms against a p50 of 19 ms).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import psutil

# A round's p50 needs a few batches to mean anything; fewer and the ratio check is skipped.
MIN_BATCHES_PER_ROUND = 3


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity; every CPU where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return list(range(psutil.cpu_count(logical=True) or 1))


def _busy_seconds(times) -> float:
    # guest time is already counted in user/nice (Linux); idle and iowait are not busy; steal is
    # time another guest of the host took from these cores: busy elsewhere.
    counted = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(times, field, 0.0) for field in counted)


def busy_cpu_seconds(cpus: Sequence[int]) -> float:
    """Busy CPU time (s) since boot summed over ``cpus``; over all CPUs when per-CPU ids don't map."""
    per_cpu = psutil.cpu_times(percpu=True)
    if cpus and max(cpus) < len(per_cpu):
        return sum(_busy_seconds(per_cpu[i]) for i in cpus)
    return _busy_seconds(psutil.cpu_times())


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


@contextlib.contextmanager
def load_window() -> Iterator[dict]:
    """Record the machine's load over the block into the yielded dict (filled on exit).

    ``busy_cores_elsewhere``: CPU seconds other processes used on this process's usable cores per
    wall second; ``usable_cores``; ``load_before`` / ``load_after``: ``os.getloadavg()``; ``wall_s``.
    """
    cpus = usable_cpus()
    record: dict = {"usable_cores": len(cpus), "load_before": _load_average()}
    busy, own, start = busy_cpu_seconds(cpus), time.process_time(), time.perf_counter()
    try:
        yield record
    finally:
        wall = time.perf_counter() - start
        elsewhere = (busy_cpu_seconds(cpus) - busy) - (time.process_time() - own)
        # /proc/stat counts in clock ticks: a short window can come out slightly below zero
        record.update(busy_cores_elsewhere=max(0.0, elsewhere / wall) if wall > 0 else 0.0,
                      load_after=_load_average(), wall_s=wall)


def rounds_for(timed_iterations: int, rounds: int) -> int:
    """Rounds actually used: at most ``rounds``, each of at least ``MIN_BATCHES_PER_ROUND`` batches; 1 = no rounds."""
    return max(1, min(rounds, timed_iterations // MIN_BATCHES_PER_ROUND))


def round_ratios(times: Mapping[str, Sequence[float]], reference: str, rounds: int,
                 per_round: int) -> dict[str, list[float]]:
    """Per model (not the reference): reference p50 / model p50 in each complete round of ``per_round`` timings."""
    ref = times[reference]
    out = {}
    for name, values in times.items():
        if name == reference:
            continue
        ratios = []
        for r in range(rounds):
            window = slice(r * per_round, (r + 1) * per_round)
            ours = float(np.percentile(values[window], 50))
            ratios.append(float(np.percentile(ref[window], 50)) / ours if ours > 0 else float("nan"))
        out[name] = ratios
    return out


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / median of ``values``; None for fewer than two finite values."""
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) < 2 or np.median(finite) <= 0:
        return None
    return float((max(finite) - min(finite)) / np.median(finite))


def noise_reasons(busy_cores_elsewhere: float, threads: int, usable_cores: int,
                  ratio_spread: Mapping[str, float | None], tails: Mapping[str, tuple[float, float]],
                  load_tolerance_cores: float, ratio_tolerance: float, max_tail_ratio: float | None,
                  reference: str = "the reference") -> list[str]:
    """Why a timing is not clean, in words; empty = clean.

    ``ratio_spread``: model -> spread of its speed ratio to ``reference`` over rounds (None = not
    measured); ``tails``: model -> (p50 ms, p95 ms). Threads beyond the usable cores count as the
    usable cores: they compete with each other, not with other processes.
    """
    reasons = []
    wanted = min(threads, usable_cores)
    if busy_cores_elsewhere + wanted > usable_cores + load_tolerance_cores:
        reasons.append(f"other processes kept {busy_cores_elsewhere:.2f} cores busy while {wanted} timing "
                       f"thread(s) ran on {usable_cores} usable cores (tolerance {load_tolerance_cores:g} cores)")
    for name, value in ratio_spread.items():
        if value is not None and value > ratio_tolerance:
            reasons.append(f"the speed ratio of `{name}` to `{reference}` varied by {value:.0%} over rounds "
                           f"(tolerance {ratio_tolerance:.0%})")
    if max_tail_ratio is not None:
        for name, (p50, p95) in tails.items():
            if p50 > 0 and p95 / p50 > max_tail_ratio:
                reasons.append(f"`{name}` p95 {p95:.3g} ms is {p95 / p50:.1f}x its p50 {p50:.3g} ms "
                               f"(limit {max_tail_ratio:g}x)")
    return reasons


def noise_summary(batches: Mapping[str, Mapping], threads: int) -> dict:
    """The comparison's ``noise`` record from each batch size's kept attempt (``batches[key]["attempts"][-1]``)."""
    kept = {key: b["attempts"][-1] for key, b in batches.items()}
    reasons = [f"batch {key.removeprefix('batch_')}: {why}" for key, k in kept.items() for why in k["reasons"]]
    spreads = {key: k["ratio_spread"] for key, k in kept.items()}
    finite = [v for s in spreads.values() for v in s.values() if v is not None]
    first, last = (next(iter(kept.values())), list(kept.values())[-1]) if kept else ({}, {})
    return {"noisy": bool(reasons), "reasons": reasons, "threads": threads,
            "busy_cores_elsewhere": max((k["busy_cores_elsewhere"] for k in kept.values()), default=0.0),
            "usable_cores": next((k["usable_cores"] for k in kept.values()), None),
            "load_before": first.get("load_before"), "load_after": last.get("load_after"),
            "ratio_spread": spreads, "max_ratio_spread": max(finite, default=None),
            "attempts": {key: len(b["attempts"]) for key, b in batches.items()},
            "batches": dict(batches)}


def noise_note(noise: Mapping) -> str:
    """One line for stderr (and the report) on a noisy comparison."""
    return ("timed on a busy machine: " + "; ".join(noise.get("reasons") or ["no reason recorded"])
            + f" (after {sum((noise.get('attempts') or {}).values()) or '?'} timing attempt(s)); "
            "re-run `python -m flows.compare` on an idle machine")
