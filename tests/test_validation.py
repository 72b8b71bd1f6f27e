"""Great Expectations suite over prepared splits: good data passes, each kind of bad data fails
with the right expectation, split and offending rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bertshrink.config.params import ValidateParams
from bertshrink.data.validation import ValidationReport, assert_valid, run_validation
from bertshrink.errors import DataValidationError

LABELS = ["business", "sport", "tech"]
PARAMS = ValidateParams(
    min_train_rows=20, min_eval_rows=6, min_text_chars=5, max_text_chars=200,
    min_class_share=0.1, max_failed_examples=3,
)


def _split(name: str, per_class: int) -> pd.DataFrame:
    """per_class rows of each label, label cycling 0,1,2,0,1,2,... and unique texts."""
    rows = [
        {"text": f"{name} story {i} about {LABELS[i % 3]} and more words", "label": i % 3}
        for i in range(per_class * 3)
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def splits() -> dict[str, pd.DataFrame]:
    return {"train": _split("train", 10), "validation": _split("validation", 3),
            "test": _split("test", 3)}


def _failure(report: ValidationReport, expectation: str, split: str, column: str | None = None):
    """The failure of ``expectation`` on ``split`` (and column), or a readable assertion error."""
    for failure in report.failures:
        if failure.expectation == expectation and failure.split == split and (
            column is None or failure.column == column
        ):
            return failure
    raise AssertionError(f"no {expectation} failure on {split}/{column}:\n{report.summary()}")


def _assert_fails(splits, expectation: str, split: str, column: str | None = None):
    """Run the suite; check success is False, the failure is reported and assert_valid raises."""
    report = run_validation(splits, LABELS, PARAMS)
    assert report.success is False
    failure = _failure(report, expectation, split, column)
    with pytest.raises(DataValidationError) as err:
        assert_valid(report)
    message = str(err.value)
    assert expectation in message and f"split '{split}'" in message
    assert "params.yaml" in message
    json.dumps(report.to_dict())
    return report, failure


def test_good_data_passes(splits):
    report = run_validation(splits, LABELS, PARAMS)
    assert report.success is True, report.summary()
    assert report.failures == []
    assert_valid(report)
    stats = report.statistics
    assert stats["evaluated_expectations"] == stats["successful_expectations"] > 0
    assert stats["splits"]["train"]["rows"] == 30
    assert stats["splits"]["test"]["evaluated_expectations"] > 0
    assert stats["splits"]["all"]["evaluated_expectations"] == 1
    summary = report.summary()
    assert summary.startswith("Data validation OK") and "\n" not in summary
    json.dumps(report.to_dict())


def test_null_text(splits):
    splits["train"].loc[4, "text"] = None
    report, failure = _assert_fails(splits, "expect_column_values_to_not_be_null", "train", "text")
    assert failure.examples[0]["row"] == 4 and failure.examples[0]["text"] is None
    assert failure.examples[0]["label"] == 1
    assert "1 of 30 rows" in failure.observed
    assert "row 4" in report.summary()


def test_blank_text(splits):
    splits["validation"].loc[2, "text"] = "  \t \n "
    _, failure = _assert_fails(splits, "expect_column_values_to_match_regex", "validation", "text")
    assert [ex["row"] for ex in failure.examples] == [2]


def test_label_outside_set(splits):
    splits["test"].loc[5, "label"] = 7
    _, failure = _assert_fails(splits, "expect_column_values_to_be_in_set", "test", "label")
    assert failure.examples == [
        {"row": 5, "text": splits["test"].loc[5, "text"], "label": 7}
    ]


def test_null_label(splits):
    splits["test"]["label"] = splits["test"]["label"].astype("float64")
    splits["test"].loc[1, "label"] = None
    _, failure = _assert_fails(splits, "expect_column_values_to_not_be_null", "test", "label")
    assert failure.examples[0]["row"] == 1 and failure.examples[0]["label"] is None


def test_too_long_text(splits):
    splits["train"].loc[7, "text"] = "word " * 100  # 500 chars > max_text_chars=200
    report, failure = _assert_fails(
        splits, "expect_column_value_lengths_to_be_between", "train", "text"
    )
    example = failure.examples[0]
    assert example["row"] == 7 and example["text"].endswith("…") and len(example["text"]) == 81
    assert "row 7" in report.summary() and "word word" in report.summary()


def test_class_missing_from_test_split(splits):
    test = splits["test"]
    splits["test"] = test[test["label"] != 2].reset_index(drop=True)  # 6 rows, no 'tech'
    report, failure = _assert_fails(splits, "expect_column_values_to_be_between", "test", "count")
    assert failure.examples == [{"label": 2, "label_name": "tech", "count": 0, "share": 0.0}]
    assert "'tech'" in report.summary()
    # a missing class is reported once (presence), not again as below the minimum share
    assert not [f for f in report.failures if f.column == "share"]


def test_a_single_class_dataset_is_refused():
    """One label would give a one-output head that scores 1.0 on anything (issue 13, row 1)."""
    one = {name: pd.DataFrame({"text": [f"{name} text number {i} about sport" for i in range(n)], "label": 0})
           for name, n in (("train", 30), ("validation", 8), ("test", 8))}
    report = run_validation(one, ["sport"], PARAMS)
    failures = [f for f in report.failures if f.expectation == "expect_table_row_count_to_be_between"]
    assert [f.split for f in failures] == ["train", "validation", "test"]
    assert failures[0].observed == "observed value: 1"
    with pytest.raises(DataValidationError, match="at least two classes"):
        assert_valid(report)


def test_class_below_min_share(splits):
    train = splits["train"]
    rare = train.index[train["label"] == 1][1:]  # keep a single 'sport' row: 1/21 < 10%
    splits["train"] = train.drop(index=rare)
    report, failure = _assert_fails(splits, "expect_column_values_to_be_between", "train", "share")
    assert [ex["label_name"] for ex in failure.examples] == ["sport"]
    assert failure.examples[0]["count"] == 1
    assert "'sport'" in report.summary()
    assert not [f for f in report.failures if f.column == "count"]


@pytest.mark.parametrize("transform", [str, lambda t: "  " + t.upper().replace(" ", "  \t") + "\n"],
                         ids=["same", "case-and-whitespace"])
def test_leakage_between_train_and_test(splits, transform):
    splits["test"].loc[3, "text"] = transform(splits["train"].loc[8, "text"])
    report, failure = _assert_fails(splits, "expect_column_values_to_be_unique", "all", "norm_text")
    assert len(failure.examples) == 1
    example = failure.examples[0]
    assert example["splits"] == ["train", "test"] and example["rows"] == {"train": 8, "test": 3}
    assert "train row 8, test row 3" in report.summary()


def test_duplicate_within_one_split_is_not_leakage(splits):
    splits["train"].loc[1, "text"] = splits["train"].loc[0, "text"]
    splits["train"].loc[1, "label"] = splits["train"].loc[0, "label"]
    splits["train"].loc[2, "label"] = 1  # keep the class shares unchanged overall
    report = run_validation(splits, LABELS, PARAMS)
    assert not [f for f in report.failures if f.split == "all"], report.summary()


@pytest.mark.parametrize("split,keep", [("train", 12), ("validation", 3)])
def test_too_few_rows(splits, split, keep):
    splits[split] = splits[split].iloc[:keep]
    _, failure = _assert_fails(splits, "expect_table_row_count_to_be_between", split)
    assert failure.column is None and str(keep) in failure.observed


def test_examples_capped_at_max_failed_examples(splits):
    splits["train"].loc[0:9, "text"] = None
    report = run_validation(splits, LABELS, PARAMS)
    failure = _failure(report, "expect_column_values_to_not_be_null", "train", "text")
    assert len(failure.examples) == PARAMS.max_failed_examples
    assert "10 of 30 rows" in failure.observed


@pytest.mark.slow
def test_data_docs_built(splits, tmp_path: Path):
    docs = tmp_path / "docs"
    splits["test"].loc[0, "label"] = 9
    report = run_validation(splits, LABELS, PARAMS, docs_dir=docs)
    index = Path(report.statistics["data_docs_index"])
    assert index.is_file() and docs in index.parents
    assert "bertshrink_rows_test" in index.read_text(encoding="utf-8")
    assert list(docs.rglob("*.html"))


def test_import_is_light():
    code = ("import sys, bertshrink.data.validation; "
            "bad = [m for m in ('great_expectations', 'prefect', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
