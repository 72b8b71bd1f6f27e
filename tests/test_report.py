"""The report: rows and ratios, the Pareto frontier, the markdown table, the plots and the CSV."""

from __future__ import annotations

import csv

import pytest

from bertshrink.selection.report import check_targets, constraint_text, markdown_table, pareto_front, report_rows, write_csv, write_plots


def result(name, accuracy, size, params, b1, b32, retention=None, agreement=None):
    return {"model": name, "format": "pytorch", "metrics": {"test": {"accuracy": accuracy, "macro_f1": accuracy - 0.01}},
            "size": {"total_bytes": size}, "parameters": params,
            "latency": {"batch_1": {"p50_ms": b1, "p95_ms": b1 * 1.2},
                        "batch_32": {"p50_ms": b32, "p95_ms": b32 * 1.1, "throughput_eps": 32000 / b32}},
            "behaviour": {"retention": retention, "agreement": agreement,
                          "by_class": {"neg": {"accuracy": accuracy, "n": 10}, "pos": {"accuracy": accuracy, "n": 12}}}}


@pytest.fixture
def results():
    return [
        result("teacher", 0.90, 90e6, 22e6, 10.0, 100.0, 1.0, 1.0),
        result("floor", 0.80, 4e6, 1e6, 1.0, 3.0, 0.889, 0.82),
        result("baseline-ort-int8", 0.90, 24e6, 22e6, 4.0, 40.0, 1.0, 0.99),
        result("tiny", 0.89, 6e6, 4e6, 1.6, 16.0, 0.989, 0.95),
        result("dominated", 0.85, 30e6, 11e6, 5.0, 50.0, 0.944, 0.9),  # slower, bigger and worse than tiny
    ]


def test_rows_order_roles_and_ratios(results):
    rows = report_rows(results, None, "baseline-ort-int8")
    assert [r["model"] for r in rows] == ["teacher", "baseline-ort-int8", "floor", "tiny", "dominated"]
    assert [r["role"] for r in rows] == ["teacher", "baseline", "floor", "candidate", "candidate"]
    tiny = rows[3]
    assert tiny["teacher_smaller"] == pytest.approx(15.0) and tiny["base_smaller"] == pytest.approx(4.0)
    assert tiny["teacher_b1_speedup"] == pytest.approx(6.25) and tiny["base_b1_speedup"] == pytest.approx(2.5)
    assert tiny["large_batch"] == 32 and tiny["teacher_large_speedup"] == pytest.approx(6.25)


def test_compared_latency_replaces_each_models_own(results):
    comparison = {"models": {"tiny": {"latency": {"batch_1": {"p50_ms": 2.0, "p95_ms": 2.5}}}}}
    rows = report_rows(results, comparison, "baseline-ort-int8")
    assert next(r for r in rows if r["model"] == "tiny")["b1_p50_ms"] == 2.0


def test_pareto_front_keeps_only_undominated_models(results):
    rows = report_rows(results, None, "baseline-ort-int8")
    # by latency: floor (fastest), tiny, baseline (as accurate as the teacher and faster); teacher ties
    # baseline's accuracy but is slower, so it is dominated; "dominated" is beaten by tiny
    assert pareto_front(rows, "b1_p50_ms") == ["floor", "tiny", "baseline-ort-int8"]
    assert next(r for r in rows if r["model"] == "dominated")["pareto_latency"] is False
    assert pareto_front([{"model": "a", "x": None, "accuracy": 0.9}], "x") == []


def test_markdown_table_has_a_row_per_model_with_units(results):
    rows = report_rows(results, None, "baseline-ort-int8")
    table = markdown_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    assert "b32 p50 ms" in lines[0] and "smaller vs teacher / base" in lines[0]
    tiny = next(line for line in lines if line.startswith("| tiny |"))
    assert "| 0.8900 |" in tiny and "| 98.9% |" in tiny and "| 15.00x / 4.00x |" in tiny and "| 6.25x / 2.50x |" in tiny
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.mark.slow
def test_plots_and_csv_are_written(results, tmp_path):
    rows = report_rows(results, None, "baseline-ort-int8")
    paths = write_plots(rows, tmp_path, "fixture")
    assert [p.name for p in paths] == ["accuracy_vs_latency.png", "accuracy_vs_size.png", "accuracy_vs_params.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with write_csv(rows, tmp_path / "models.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["model"] for r in table] == [r["model"] for r in rows]
    assert float(table[3]["b1_p50_ms"]) == 1.6 and table[3]["pareto_latency"] == "True"


def test_targets_are_checked_against_the_row(results):
    rows = report_rows(results, None, "baseline-ort-int8")
    tiny = next(r for r in rows if r["model"] == "tiny")
    checks = {c["target"]: c["met"] for c in check_targets(tiny, {
        "min_retention": 0.98, "min_b1_speedup_vs_teacher": 6.0, "min_b1_speedup_vs_baseline": 3.0,
        "min_smaller_vs_teacher": 15.0, "min_smaller_vs_baseline": 4.0})}
    assert checks == {"min_retention": True, "min_b1_speedup_vs_teacher": True, "min_b1_speedup_vs_baseline": False,
                      "min_smaller_vs_teacher": True, "min_smaller_vs_baseline": True}


def test_retention_intervals_are_shown_where_computed(results):
    results[3]["behaviour"].update(retention_low=0.962, retention_high=1.013)
    results[3]["selection"] = {"accuracy": 0.88, "retention": 0.995, "retention_low": 0.981, "retention_high": 1.008}
    rows = report_rows(results, None, "baseline-ort-int8")
    tiny_line = next(line for line in markdown_table(rows).splitlines() if line.startswith("| tiny |"))
    assert "| 98.9% [96.2, 101.3] |" in tiny_line and "| 99.5% [98.1, 100.8] |" in tiny_line
    tiny = next(r for r in rows if r["model"] == "tiny")
    retention = check_targets(tiny, {"min_retention": 0.98})[0]
    assert retention["measured_text"] == "98.90% (95% interval 96.20% to 101.30%)"


def test_the_rule_text_names_the_bound_it_judges():
    assert constraint_text({"min_retention": 0.99, "min_agreement": 0.85, "retention_bound": "point"}) == \
        "retention >= 99%, agreement >= 85%"
    assert constraint_text({"min_retention": 0.99, "retention_bound": "lower"}) == "retention's 95% lower bound >= 99%"


def test_the_benchmark_write_up_states_the_rule_and_its_reasons(results):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_sst2", Path(__file__).parent.parent / "benchmarks" / "sst2.py")
    sst2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sst2)
    promotion = {"objective": "fastest", "constraints": {"min_retention": 0.99, "min_agreement": 0.85},
                 "reason": "fastest of 2 eligible: tiny v3", "champion_reason": "tiny v3 becomes champion"}
    text = sst2.benchmarks_markdown(report_rows(results, None, "baseline-ort-int8"), promotion, "tiny", [], [],
                                    "machine", "configs/sst2.yaml", "1.0 min", "")
    assert ("Rule: `fastest` among models with retention >= 99%, agreement >= 85%. Challenger: fastest of 2 "
            "eligible: tiny v3. Champion: tiny v3 becomes champion.") in text
