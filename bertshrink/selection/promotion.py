"""The promotion rule: which measured model becomes the challenger, and when it replaces the champion.

Pure functions over ``Candidate`` records (no MLflow here): the pipeline and the by-hand CLI
(``python -m flows.promote``) both decide through them, so a person and the pipeline apply the same
checks. A model is eligible only if it was evaluated, did not collapse, is registered, and meets
every constraint; the objective then picks one, with fixed tie-breaks so the choice is stable.

Accuracy, retention and agreement are the validation split's: the test split only reports. A rule
that chose on test figures would report them inflated by the choice itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from bertshrink.config.knobs import JUDGED_RETENTION_WORDS, PromotionConstraints
from bertshrink.config.params import RegistryParams
from bertshrink.selection.rules import reported_accuracy

Objective = Literal["fastest", "smallest", "most_accurate"]
OBJECTIVES: tuple[str, ...] = ("fastest", "smallest", "most_accurate")
CHALLENGER_ALIAS = "challenger"
CHAMPION_ALIAS = "champion"
OK = "ok"
STALE = "stale (its metrics measured another model than the registered one: evaluate and register it again)"


@dataclass(frozen=True)
class Candidate:
    """What the rule needs to know of one model (figures from its evaluation)."""

    name: str
    version: str | None = None        # registered model version; None = not registered
    accuracy: float | None = None     # validation accuracy (what the rule judges)
    retention: float | None = None    # validation accuracy / the teacher's
    agreement: float | None = None    # share of validation predictions equal to the teacher's
    p50_ms: float | None = None       # batch-1 latency
    p95_ms: float | None = None
    size_bytes: int | None = None
    status: str = OK                  # ok | failed | collapsed
    test_accuracy: float | None = None  # reported beside the choice, never used to make it
    retention_low: float | None = None  # retention's paired 95% interval (validation)
    retention_high: float | None = None


# The rule's limits are declared once, in the config layer; the registry section composes them.
Constraints = PromotionConstraints


@dataclass(frozen=True)
class Choice:
    """The rule's pick (None when nothing is eligible), why, and why each other model was not eligible."""

    chosen: Candidate | None
    reason: str
    eligible: tuple[str, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChampionDecision:
    promote: bool
    reason: str


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def violations(candidate: Candidate, constraints: Constraints) -> list[str]:
    """Each constraint ``candidate`` breaks, in words (a missing figure breaks the constraint on it)."""
    checks = [
        (JUDGED_RETENTION_WORDS[constraints.retention_bound],
         constraints.judged_retention(candidate.retention, candidate.retention_low), constraints.min_retention,
         "min", "{:.2%}"),
        ("agreement with the teacher", candidate.agreement, constraints.min_agreement, "min", "{:.2%}"),
        ("batch-1 p95 latency (ms)", candidate.p95_ms, constraints.max_p95_ms, "max", "{:.2f}"),
        ("size (MB)", None if candidate.size_bytes is None else candidate.size_bytes / 1e6,
         constraints.max_size_mb, "max", "{:.2f}"),
    ]
    found = []
    for what, value, limit, kind, fmt in checks:
        if limit is None:
            continue
        if _missing(value):
            found.append(f"{what} not measured")
        elif (kind == "min" and value < limit) or (kind == "max" and value > limit):
            sign = ">=" if kind == "min" else "<="
            found.append(f"{what} {fmt.format(value)} breaks {sign} {fmt.format(limit)}")
    return found


def ineligibility(candidate: Candidate, constraints: Constraints) -> str | None:
    """Why ``candidate`` may not be promoted, or None if it may."""
    if candidate.status != OK:
        return f"status {candidate.status}"
    if candidate.version is None:
        return "not registered"
    broken = violations(candidate, constraints)
    return "; ".join(broken) if broken else None


def objective_value(candidate: Candidate, objective: str) -> float:
    """Lower is better: batch-1 p50 ms (fastest), bytes (smallest), minus accuracy (most_accurate)."""
    value = {"fastest": candidate.p50_ms, "smallest": candidate.size_bytes,
             "most_accurate": None if candidate.accuracy is None else -candidate.accuracy}[_known(objective)]
    return math.inf if _missing(value) else float(value)


def _known(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    return objective


def _sort_key(candidate: Candidate, objective: str) -> tuple:
    # Ties on the objective go to the more accurate, then the smaller, then the faster, then by name.
    def num(x, sign=1.0):
        return math.inf if _missing(x) else sign * float(x)
    return (objective_value(candidate, objective), num(candidate.accuracy, -1.0), num(candidate.size_bytes),
            num(candidate.p50_ms), candidate.name)


def describe(candidate: Candidate) -> str:
    """``name vN (val acc 0.8498, val retention 98.2%, val agreement 93.1%, b1 forward p50 1.56 ms, p95 1.80 ms,
    6.0 MB; test acc 0.8470)``: the rule's figures (validation; forward pass alone, not text to label), then
    the reported test accuracy."""
    parts = []
    if not _missing(candidate.accuracy):
        parts.append(f"val acc {candidate.accuracy:.4f}")
    if not _missing(candidate.retention):
        interval = ("" if _missing(candidate.retention_low) or _missing(candidate.retention_high)
                    else f" [{candidate.retention_low:.1%}, {candidate.retention_high:.1%}]")
        parts.append(f"val retention {candidate.retention:.1%}{interval}")
    if not _missing(candidate.agreement):
        parts.append(f"val agreement {candidate.agreement:.1%}")
    if not _missing(candidate.p50_ms):
        parts.append(f"b1 forward p50 {candidate.p50_ms:.2f} ms")
    if not _missing(candidate.p95_ms):
        parts.append(f"p95 {candidate.p95_ms:.2f} ms")
    if candidate.size_bytes is not None:
        parts.append(f"{candidate.size_bytes / 1e6:.1f} MB")
    version = f" v{candidate.version}" if candidate.version else ""
    reported = "" if _missing(candidate.test_accuracy) else f"; test acc {candidate.test_accuracy:.4f}"
    return f"{candidate.name}{version} ({', '.join(parts)}{reported})"


def choose(candidates: Sequence[Candidate], constraints: Constraints, objective: str) -> Choice:
    """The best eligible candidate by ``objective``, with a reason; ``chosen`` is None if none is eligible."""
    _known(objective)
    rejected = {c.name: why for c in candidates if (why := ineligibility(c, constraints))}
    eligible = sorted((c for c in candidates if c.name not in rejected), key=lambda c: _sort_key(c, objective))
    if not candidates:
        return Choice(None, "no candidates to choose from")
    if not eligible:
        return Choice(None, f"no eligible candidate among {len(candidates)}: "
                            + "; ".join(f"{n}: {why}" for n, why in rejected.items()), (), rejected)
    best = eligible[0]
    reason = f"{objective.replace('_', ' ')} of {len(eligible)} eligible: {describe(best)}"
    if len(eligible) > 1:
        runner_up = eligible[1]
        tie = objective_value(runner_up, objective) == objective_value(best, objective)
        reason += f"; {'tied with, and preferred by accuracy/size/speed/name over' if tie else 'next'}: {describe(runner_up)}"
    return Choice(best, reason, tuple(c.name for c in eligible), rejected)


def improvement(challenger: Candidate, champion: Candidate, objective: str) -> float | None:
    """Relative gain of the challenger on the objective (0.10 = 10% faster / smaller / more accurate)."""
    if objective == "most_accurate":
        ours, theirs = challenger.accuracy, champion.accuracy
        return None if _missing(ours) or _missing(theirs) or not theirs else (ours - theirs) / theirs
    ours, theirs = ((challenger.p50_ms, champion.p50_ms) if _known(objective) == "fastest"
                    else (challenger.size_bytes, champion.size_bytes))
    return None if _missing(ours) or _missing(theirs) or not theirs else (theirs - ours) / theirs


def champion_decision(challenger: Candidate | None, champion: Candidate | None, *, objective: str,
                      margin: float, auto_promote: bool, champion_set_by_pipeline: bool,
                      constraints: Constraints) -> ChampionDecision:
    """Whether the pipeline moves ``champion`` to ``challenger``, and why (or why not).

    Only with ``auto_promote``; never over a champion a person set (the pipeline then only proposes);
    never to a model that is ineligible; only when the objective improves by at least ``margin``.
    """
    if challenger is None:
        return ChampionDecision(False, "no challenger: nothing is eligible")
    if not auto_promote:
        return ChampionDecision(False, "registry.auto_promote is false: the challenger is proposed; "
                                       "promote it by hand (MLflow UI or `python -m flows.promote`)")
    why_not = ineligibility(challenger, constraints)
    if why_not:
        return ChampionDecision(False, f"challenger {challenger.name} is not eligible: {why_not}")
    if champion is None:
        return ChampionDecision(True, f"no champion yet: {describe(challenger)} becomes champion")
    if not champion_set_by_pipeline:
        return ChampionDecision(False, f"champion v{champion.version} was set by hand; the pipeline leaves it "
                                       "and only proposes through the challenger alias")
    if champion.version is not None and champion.version == challenger.version:
        return ChampionDecision(False, f"challenger v{challenger.version} is already the champion")
    gain = improvement(challenger, champion, objective)
    if gain is None:
        return ChampionDecision(True, f"champion v{champion.version} has no recorded {objective} figure to "
                                      f"compare; {describe(challenger)} replaces it")
    verdict = (f"{objective.replace('_', ' ')}: challenger {describe(challenger)} vs champion {describe(champion)}: "
               f"{gain:+.1%} (margin {margin:.1%})")
    return ChampionDecision(gain >= margin, ("beats the champion; " if gain >= margin else "not enough; ") + verdict)


def check_manual_promotion(candidate: Candidate, constraints: Constraints, force: bool = False,
                           why: str | None = None) -> str:
    """The reason recorded for a promotion by hand; refuses (ValueError) an ineligible model unless forced."""
    problem = ineligibility(candidate, constraints)
    if problem is None:
        return f"promoted by hand; meets the rule: {describe(candidate)}"
    if not force:
        raise ValueError(f"{describe(candidate)} breaks the promotion rule: {problem}. Use --force with "
                         "--reason \"...\" to promote it anyway; the override and the reason are recorded.")
    if not why:
        raise ValueError("--force needs --reason \"...\": the override is recorded on the model version")
    return f"forced by hand over: {problem}; reason given: {why}"


def candidate_from_result(name: str, result: dict | None, record: dict | None = None,
                          latency: dict | None = None) -> Candidate:
    """A ``Candidate`` from an evaluation result, its registration record and (optionally) compared latency.

    No result means the evaluation failed; a record with ``registered: false`` means it collapsed; a
    record whose model fingerprint differs from the result's means the metrics are stale. The rule's
    figures come from the result's ``selection`` block (validation); a result without one (evaluated
    before the rule moved off the test split) leaves them missing, so the model is not eligible until
    it is evaluated again.
    """
    if not result:
        return Candidate(name, status="failed")
    latency = latency or result.get("latency") or {}
    b1 = latency.get("batch_1") or {}
    selection = result.get("selection") or {}
    record = record or {}
    if record.get("model_fingerprint") not in (None, result.get("model_fingerprint")):
        # the registered version is not the model these metrics measured: promote on neither
        return Candidate(name, status=STALE)
    status = "collapsed" if record.get("collapsed") else OK
    return Candidate(
        name=name, version=None if record.get("registered") is False else record.get("version"),
        accuracy=selection.get("accuracy"), retention=selection.get("retention"),
        retention_low=selection.get("retention_low"), retention_high=selection.get("retention_high"),
        agreement=selection.get("agreement"),
        p50_ms=b1.get("p50_ms"), p95_ms=b1.get("p95_ms"), size_bytes=(result.get("size") or {}).get("total_bytes"),
        status=status, test_accuracy=reported_accuracy(result))


def candidate_from_tags(name: str, version: str, tags: dict[str, str]) -> Candidate:
    """A ``Candidate`` from a registered version's ``metric.*`` tags (what registration recorded)."""
    def number(key: str):
        try:
            return float(tags[f"metric.{key}"])
        except (KeyError, ValueError):
            return None
    size = number("size.total_bytes")
    return Candidate(name=name, version=str(version), accuracy=number("selection.accuracy"),
                     retention=number("selection.retention"), retention_low=number("selection.retention_low"),
                     retention_high=number("selection.retention_high"), agreement=number("selection.agreement"),
                     p50_ms=number("latency.batch_1.p50_ms"), p95_ms=number("latency.batch_1.p95_ms"),
                     size_bytes=None if size is None else int(size),
                     status="collapsed" if tags.get("collapsed") == "true" else OK,
                     test_accuracy=number("test.accuracy"))


def constraints_of(registry: RegistryParams) -> Constraints:
    """The promotion constraints of the ``registry`` section."""
    return registry.constraints()
