"""The promotion rule: eligibility, each objective, ties, the champion decision, promotion by hand."""

from __future__ import annotations

import pytest

from bertshrink.selection.promotion import (Candidate, Constraints, candidate_from_result, candidate_from_tags,
                                  champion_decision, check_manual_promotion, choose, describe, improvement,
                                  violations)

RULE = Constraints(min_retention=0.98, min_agreement=0.9, max_p95_ms=10.0, max_size_mb=50.0)


def model(name, version="1", accuracy=0.90, retention=0.99, agreement=0.95, p50=5.0, p95=6.0, size=20e6,
          status="ok") -> Candidate:
    return Candidate(name, version, accuracy, retention, agreement, p50, p95, int(size), status)


def decide(challenger, champion, *, auto=True, by_pipeline=True, margin=0.05, objective="fastest"):
    return champion_decision(challenger, champion, objective=objective, margin=margin, auto_promote=auto,
                             champion_set_by_pipeline=by_pipeline, constraints=RULE)


# ----------------------------------------------------------------------------- constraints


def test_a_model_within_every_constraint_has_no_violations():
    assert violations(model("ok"), RULE) == []


@pytest.mark.parametrize("change, words", [
    ({"retention": 0.97}, "retention 97.00% breaks >= 98.00%"),
    ({"agreement": 0.85}, "agreement with the teacher 85.00% breaks >= 90.00%"),
    ({"p95": 12.0}, "batch-1 p95 latency (ms) 12.00 breaks <= 10.00"),
    ({"size": 60e6}, "size (MB) 60.00 breaks <= 50.00"),
    ({"agreement": None}, "agreement with the teacher not measured"),
])
def test_each_broken_constraint_is_named(change, words):
    assert violations(model("m", **change), RULE) == [words]


def test_the_lower_bound_rule_judges_the_intervals_lower_end():
    close_call = Candidate("m", "1", 0.9, 0.99, 0.95, 5.0, 6.0, 20_000_000, retention_low=0.965, retention_high=1.01)
    assert violations(close_call, RULE) == []
    lower = RULE.model_copy(update={"retention_bound": "lower"})
    assert violations(close_call, lower) == ["retention's 95% lower bound 96.50% breaks >= 98.00%"]
    sure = Candidate("m", "1", 0.9, 0.99, 0.95, 5.0, 6.0, 20_000_000, retention_low=0.985, retention_high=0.995)
    assert violations(sure, lower) == []
    assert violations(model("no interval"), lower) == ["retention's 95% lower bound not measured"]
    assert "val retention 99.0% [96.5%, 101.0%]" in describe(close_call)


def test_no_limits_means_nothing_is_violated():
    assert violations(model("m", retention=0.1, agreement=0.1, p95=1e6, size=1e12), Constraints()) == []


# ----------------------------------------------------------------------------- choose


def test_fastest_smallest_and_most_accurate_pick_different_models():
    fast = model("fast", "1", accuracy=0.88, p50=2.0, size=30e6)
    small = model("small", "2", accuracy=0.89, p50=4.0, size=5e6)
    accurate = model("accurate", "3", accuracy=0.91, p50=8.0, size=40e6)
    candidates = [accurate, small, fast]
    assert choose(candidates, RULE, "fastest").chosen == fast
    assert choose(candidates, RULE, "smallest").chosen == small
    assert choose(candidates, RULE, "most_accurate").chosen == accurate


def test_failed_collapsed_unregistered_and_constraint_breakers_are_never_chosen():
    candidates = [
        model("failed", status="failed", p50=0.1),
        model("collapsed", status="collapsed", p50=0.2),
        model("unregistered", version=None, p50=0.3),
        model("too-slow-p95", p50=0.4, p95=50.0),
        model("low-retention", p50=0.5, retention=0.5),
        model("fine", p50=9.0),
    ]
    choice = choose(candidates, RULE, "fastest")
    assert choice.chosen.name == "fine" and choice.eligible == ("fine",)
    assert choice.rejected == {
        "failed": "status failed", "collapsed": "status collapsed", "unregistered": "not registered",
        "too-slow-p95": "batch-1 p95 latency (ms) 50.00 breaks <= 10.00",
        "low-retention": "retention 50.00% breaks >= 98.00%"}
    assert choice.reason.startswith("fastest of 1 eligible: fine v1")


def test_no_eligible_candidate_returns_none_with_every_reason():
    choice = choose([model("a", retention=0.5), model("b", status="failed")], RULE, "smallest")
    assert choice.chosen is None
    assert "no eligible candidate among 2" in choice.reason and "a: retention" in choice.reason
    assert "b: status failed" in choice.reason


def test_empty_candidate_list():
    choice = choose([], RULE, "fastest")
    assert choice.chosen is None and choice.reason == "no candidates to choose from"


def test_ties_go_to_the_more_accurate_then_smaller_then_name():
    a = model("a", "1", accuracy=0.90, p50=3.0, size=10e6)
    b = model("b", "2", accuracy=0.92, p50=3.0, size=10e6)
    assert choose([a, b], RULE, "fastest").chosen == b
    assert "tied with" in choose([a, b], RULE, "fastest").reason
    c = model("c", "3", accuracy=0.92, p50=3.0, size=8e6)
    assert choose([a, b, c], RULE, "fastest").chosen == c
    d = model("d", "4", accuracy=0.92, p50=3.0, size=8e6)
    assert choose([d, c], RULE, "fastest").chosen == c  # identical figures: by name, stable across runs


def test_a_missing_objective_figure_ranks_last_not_first():
    unknown = model("unknown", p50=None)
    known = model("known", p50=9.0)
    assert choose([unknown, known], RULE, "fastest").chosen == known


def test_unknown_objective_is_rejected():
    with pytest.raises(ValueError, match="objective must be one of"):
        choose([model("a")], RULE, "cheapest")


# ----------------------------------------------------------------------------- champion


def test_no_challenger_promotes_nothing():
    decision = decide(None, model("champ"))
    assert not decision.promote and "no challenger" in decision.reason


def test_without_auto_promote_the_challenger_is_only_proposed():
    decision = decide(model("new", "2"), None, auto=False)
    assert not decision.promote and "auto_promote is false" in decision.reason


def test_first_champion_when_there_is_none():
    decision = decide(model("new", "2"), None)
    assert decision.promote and "no champion yet" in decision.reason


def test_a_champion_set_by_hand_is_left_alone_even_if_beaten():
    decision = decide(model("new", "2", p50=1.0), model("old", "1", p50=9.0), by_pipeline=False)
    assert not decision.promote and "set by hand" in decision.reason


def test_an_ineligible_challenger_never_becomes_champion():
    decision = decide(model("new", "2", retention=0.5), None)
    assert not decision.promote and "not eligible" in decision.reason


def test_already_champion():
    decision = decide(model("same", "3"), model("same", "3"))
    assert not decision.promote and "already the champion" in decision.reason


@pytest.mark.parametrize("new_p50, promote", [(4.0, True), (4.75, True), (4.9, False), (6.0, False)])
def test_the_margin_decides(new_p50, promote):
    # champion at 5.0 ms, margin 5%: 4.75 ms is exactly 5% faster (counts), 4.9 ms is 2% (does not)
    decision = decide(model("new", "2", p50=new_p50), model("old", "1", p50=5.0))
    assert decision.promote is promote
    assert ("beats the champion" if promote else "not enough") in decision.reason


def test_improvement_per_objective():
    new, old = model("n", accuracy=0.92, p50=4.0, size=10e6), model("o", accuracy=0.90, p50=5.0, size=20e6)
    assert improvement(new, old, "fastest") == pytest.approx(0.2)
    assert improvement(new, old, "smallest") == pytest.approx(0.5)
    assert improvement(new, old, "most_accurate") == pytest.approx(0.02 / 0.90)
    assert improvement(new, model("o", p50=None), "fastest") is None


def test_a_champion_without_recorded_figures_is_replaced():
    decision = decide(model("new", "2"), model("old", "1", p50=None))
    assert decision.promote and "no recorded fastest figure" in decision.reason


# ----------------------------------------------------------------------------- by hand


def test_promotion_by_hand_passes_the_same_checks():
    assert check_manual_promotion(model("ok"), RULE).startswith("promoted by hand; meets the rule")
    with pytest.raises(ValueError, match="breaks the promotion rule: retention"):
        check_manual_promotion(model("bad", retention=0.5), RULE)


def test_force_needs_and_records_a_reason():
    with pytest.raises(ValueError, match="--force needs --reason"):
        check_manual_promotion(model("bad", retention=0.5), RULE, force=True)
    reason = check_manual_promotion(model("bad", retention=0.5), RULE, force=True, why="customer demo")
    assert "forced by hand over: retention" in reason and "customer demo" in reason


# ----------------------------------------------------------------------------- from files and tags


def test_candidate_from_an_evaluation_result_prefers_the_compared_latency():
    result = {"metrics": {"test": {"accuracy": 0.9}, "validation": {"accuracy": 0.8}}, "size": {"total_bytes": 1000},
              "behaviour": {"retention": 0.5, "agreement": 0.5},  # test figures: reported, not judged
              "selection": {"split": "validation", "accuracy": 0.8, "retention": 0.99, "agreement": 0.97},
              "latency": {"batch_1": {"p50_ms": 9.0, "p95_ms": 10.0}}}
    compared = {"batch_1": {"p50_ms": 4.0, "p95_ms": 5.0}}
    c = candidate_from_result("m", result, {"version": "7"}, compared)
    assert (c.version, c.accuracy, c.retention, c.agreement, c.p50_ms, c.p95_ms, c.size_bytes, c.status) == \
        ("7", 0.8, 0.99, 0.97, 4.0, 5.0, 1000, "ok")
    assert c.test_accuracy == 0.9 and "val acc 0.8000" in describe(c) and "test acc 0.9000" in describe(c)
    assert candidate_from_result("m", None).status == "failed"
    collapsed = candidate_from_result("m", result, {"registered": False, "collapsed": True})
    assert collapsed.status == "collapsed" and collapsed.version is None


def test_candidate_from_version_tags():
    tags = {"metric.test.accuracy": "0.9", "metric.behaviour.retention": "0.5", "metric.behaviour.agreement": "0.5",
            "metric.selection.accuracy": "0.85", "metric.selection.retention": "0.99",
            "metric.selection.agreement": "0.95", "metric.selection.retention_low": "0.97",
            "metric.selection.retention_high": "1.01",
            "metric.latency.batch_1.p50_ms": "3.0", "metric.latency.batch_1.p95_ms": "4.0",
            "metric.size.total_bytes": "5000000.0"}
    c = candidate_from_tags("m", "4", tags)
    assert (c.version, c.accuracy, c.retention, c.test_accuracy, c.p95_ms, c.size_bytes) == \
        ("4", 0.85, 0.99, 0.9, 4.0, 5_000_000)
    assert (c.retention_low, c.retention_high) == (0.97, 1.01)
    assert violations(c, RULE) == []
    assert candidate_from_tags("m", "4", {}).retention is None
