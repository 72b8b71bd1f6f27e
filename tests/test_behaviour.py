"""Beyond accuracy: agreement, per-class and per-length accuracy, disagreements, spread over seeds."""

from __future__ import annotations

import math

import pytest

import numpy as np

from bertshrink.evaluation.behaviour import (accuracy_by_class, accuracy_by_length, agreement, behaviour_report, bucket_names,
                                  disagreement_table, fidelity, length_bucket_edges, paired_outcomes,
                                  retention_interval, spread)


def test_agreement_counts_equal_predictions_whatever_the_labels():
    assert agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert agreement([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="same split"):
        agreement([0, 1], [0, 1, 1])


def test_accuracy_by_class_is_each_class_recall():
    by_class = accuracy_by_class([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["neg", "pos"])
    assert by_class == {"neg": {"accuracy": 0.5, "n": 2}, "pos": {"accuracy": pytest.approx(2 / 3), "n": 3}}
    missing = accuracy_by_class([0, 0], [0, 0], ["neg", "very pos!"])
    assert math.isnan(missing["very_pos"]["accuracy"]) and missing["very_pos"]["n"] == 0  # MLflow-safe key


def test_length_buckets_split_by_word_count():
    texts = ["a"] * 3 + ["a b c d e"] * 3 + [" ".join(["w"] * 20)] * 3
    edges = length_bucket_edges(texts)
    assert edges == [1, 5]
    assert bucket_names(edges) == ["words_1-1", "words_2-5", "words_6-up"]
    labels = [0] * 9
    predictions = [0, 0, 0, 0, 1, 1, 1, 1, 1]  # right on short, 1/3 on medium, wrong on long
    by_length = accuracy_by_length(texts, labels, predictions, edges)
    assert by_length["words_1-1"] == {"accuracy": 1.0, "n": 3}
    assert by_length["words_2-5"]["accuracy"] == pytest.approx(1 / 3)
    assert by_length["words_6-up"] == {"accuracy": 0.0, "n": 3}


def test_disagreement_table_lists_only_disagreements_and_who_was_right():
    table = disagreement_table(["t0", "t1", "t2", "t3"], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], ["neg", "pos"])
    assert table["row"].tolist() == [1, 2, 3]
    assert table["right"].tolist() == ["candidate", "teacher", "teacher"]
    assert table.loc[0, "teacher"] == "neg" and table.loc[0, "candidate"] == "pos"
    assert len(disagreement_table(["a"], [0], [0], [0], ["neg"])) == 0


def test_behaviour_report_adds_teacher_figures_only_when_given():
    texts, labels = ["a b", "c", "d e f", "g"], [0, 1, 0, 1]
    alone = behaviour_report(texts, labels, [0, 1, 1, 1], ["neg", "pos"])
    assert "agreement" not in alone and "retention" not in alone
    with_teacher = behaviour_report(texts, labels, [0, 1, 1, 1], ["neg", "pos"], [0, 1, 0, 1], teacher_accuracy=1.0)
    assert with_teacher["agreement"] == 0.75 and with_teacher["disagreements"] == 1
    assert with_teacher["retention"] == 0.75


def test_spread_over_seeds():
    s = spread([0.80, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02) and s["n"] == 3
    assert (s["min"], s["max"]) == (0.80, 0.84)
    assert spread([0.9])["std"] == 0.0 and spread([])["n"] == 0 and spread([None, 0.5])["n"] == 1


def paired(both: int, candidate_only: int, teacher_only: int, neither: int):
    """Labels, candidate and teacher predictions with those outcome counts (binary, all labels 1)."""
    labels = np.ones(both + candidate_only + teacher_only + neither, dtype=int)
    candidate = np.r_[np.ones(both), np.ones(candidate_only), np.zeros(teacher_only), np.zeros(neither)].astype(int)
    teacher = np.r_[np.ones(both), np.zeros(candidate_only), np.ones(teacher_only), np.zeros(neither)].astype(int)
    return labels, candidate, teacher


def test_paired_outcomes_count_who_was_right():
    assert paired_outcomes([0, 1, 1, 0, 1], [0, 1, 0, 1, 0], [1, 1, 1, 0, 0]) == \
        {"both": 1, "candidate_only": 1, "teacher_only": 2, "neither": 1}
    with pytest.raises(ValueError, match="same split"):
        paired_outcomes([0, 1], [0, 1], [0])


def test_retention_interval_matches_the_normal_approximation_on_sst2_dev_counts():
    # SST-2 dev, bench of 2026-12-02: teacher 744/872 right, student 724; the teacher alone right on 54, the
    # student alone on 34. Delta method by hand: retention = 1 + d / 0.8532 with d = (34 - 54) / 872 and
    # sd(d) = sqrt((34 + 54) / 872 - (20 / 872)^2) / sqrt(872) = 0.010729, so 0.97312 +- 1.96 * 0.012576
    # = [0.9485, 0.9978]. (Resampling rows, 2,000 times, gave [0.950, 0.997] on the real predictions.)
    labels, student, teacher = paired(690, 34, 54, 94)
    low, high = retention_interval(labels, student, teacher)
    assert low == pytest.approx(0.9485, abs=0.003) and high == pytest.approx(0.9978, abs=0.003)
    assert retention_interval(labels, student, teacher) == (low, high)  # seeded: the same figures every time
    wider = retention_interval(*paired(69, 3, 5, 10))  # a tenth of the texts: about sqrt(10) times wider
    assert (wider[1] - wider[0]) / (high - low) == pytest.approx(10 ** 0.5, rel=0.25)


def test_a_candidate_that_never_differs_from_the_teacher_has_no_spread():
    labels, student, teacher = paired(800, 0, 0, 72)
    assert retention_interval(labels, student, teacher) == (1.0, 1.0)


def test_fidelity_gives_the_interval_only_with_the_teachers_predictions():
    labels, student, teacher = paired(690, 34, 54, 94)
    alone = fidelity(labels, student, teacher_accuracy=744 / 872)
    assert "retention" in alone and "retention_low" not in alone
    figures = fidelity(labels, student, teacher, 744 / 872)
    assert figures["retention"] == pytest.approx(724 / 744)
    assert figures["retention_low"] < figures["retention"] < figures["retention_high"]
