"""Faulty inputs get one clear message, nothing is dropped silently, and nothing good is lost:
unreadable data files, too few rows, damaged weights, unwritable outputs, and a source that fails
its checks (issue 13)."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import BaseParams, DataParams, TeacherParams, ValidateParams
from bertshrink.data.prepare import prepare_splits, write_prepared
from bertshrink.data.sources import RawDataset, load_raw_dataset
from bertshrink.errors import DataSourceError, DataValidationError, ModelSourceError, OutputError
from bertshrink.modelfolder.load import load_classifier, load_tokenizer_and_classifier
from bertshrink.modelfolder.runners import open_model
from bertshrink.modelfolder.structure import FFN_KEY
from conftest import build_tiny_bert, run_module, toy_corpus, toy_raw
from tasks import teacher as teacher_task
from tasks.data import prepare_data


def _prepare(path: Path) -> dict:
    return prepare_splits(load_raw_dataset(str(path)), DataParams(), seed=0).meta


# ---------------------------------------------------------------- data files that cannot be read


def test_a_header_only_csv_says_it_has_no_rows(tmp_path):
    path = tmp_path / "only-header.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataSourceError, match=r"only-header.csv has a header but no rows\. Point data.source"):
        load_raw_dataset(str(path))


def test_a_latin1_csv_says_it_is_not_utf8_and_where(tmp_path):
    path = tmp_path / "latin.csv"
    # line 1 is 11 bytes, line 2 is 15: the 0xe9 of "café" is byte 26 + 3
    path.write_bytes(b"text,label\ngood movie,pos\ncaf\xe9 bad,neg\n")
    with pytest.raises(DataSourceError) as caught:
        load_raw_dataset(str(path))
    assert str(caught.value).startswith(f"{path} is not UTF-8 text: line 3 has byte 0xe9 at byte offset 29.")
    assert "iconv -f latin1 -t utf-8 latin.csv" in str(caught.value) and "\n" not in str(caught.value)


def test_a_ragged_tsv_names_the_line_and_the_field_counts(tmp_path):
    path = tmp_path / "ragged.tsv"
    rows = [f"text {i}\tpos" for i in range(7)] + ["a\tb\tc\td"]  # the 8th row is line 9
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataSourceError, match=r"ragged.tsv line 9 has 4 fields where the header has 2: a tab "
                                              r"inside a text\? Quote that text"):
        load_raw_dataset(str(path))


def test_a_one_row_source_says_how_many_rows_carving_needs(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\nhello world,pos\n")
    with pytest.raises(DataSourceError) as caught:  # not sklearn's ValueError, which Prefect retried
        _prepare(path)
    assert str(caught.value) == (
        f"{path} has 1 labelled training row; carving test (15%) and validation (15%) out of them needs at "
        "least 3. Add rows, give the source its own validation and test files (a folder with "
        "train/validation/test files), or lower data.validation_size / data.test_size.")


# ---------------------------------------------------------------- rows dropped, and said so


def _write_csv(path: Path, rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for row in rows:
            writer.writerow(row) if row else handle.write("\n")


def test_each_kind_of_dropped_row_is_reported_with_its_source_lines(tmp_path, caplog, monkeypatch):
    frame = toy_corpus(25)
    base, held_out = frame.iloc[:60], frame.iloc[60:75]
    rows = [("text", "label"), ("film actor\nmovie scene", "film")]  # one quoted text over lines 2-3
    rows += list(base.iloc[1:].itertuples(index=False, name=None))  # lines 4..62
    rows += [()]  # line 63: an empty line, which the reader skips
    rows += [("" if i % 2 else "   ", "film") for i in range(15)]  # lines 64..78: blank texts
    rows += [("a text without a label", ""), ("another one without", "")]  # lines 79, 80
    rows += [(f"  {t.upper()} ", label) for t, label in base.iloc[1:4].itertuples(index=False)]  # 81..83
    rows += [(held_out.iloc[0]["text"], held_out.iloc[0]["label"])]  # line 84: also in the test file
    _write_csv(tmp_path / "train.csv", rows)
    held_out.to_csv(tmp_path / "test.csv", index=False)
    monkeypatch.setattr(logging.getLogger("bertshrink.data.prepare"), "disabled", False)
    with caplog.at_level("WARNING", logger="bertshrink.data.prepare"):
        prepared = prepare_splits(load_raw_dataset(str(tmp_path)), DataParams(), seed=0)
    assert prepared.meta["dropped"] == {
        "blank_text": {"train": {"count": 15, "lines": list(range(64, 79))}},
        "missing_label": {"train": {"count": 2, "lines": [79, 80]}},
        "duplicate": {"train": {"count": 3, "lines": [81, 82, 83]}},
        "in_evaluation_split": {"train": {"count": 1, "lines": [84]}},
    }
    assert sum(prepared.meta["rows"].values()) == 60 + 15  # the 60 good train rows and the test file's 15
    written = json.loads((write_prepared(prepared, tmp_path / "prepared") / "meta.json").read_text())
    assert written["dropped"] == prepared.meta["dropped"]
    assert f"dropped 15 of 81 train rows of {tmp_path / 'train.csv'} with a blank text: lines 64, 65" in caplog.text
    assert "dropped 2 of 81 train rows" in caplog.text and "with no label: lines 79, 80" in caplog.text
    assert prepared.meta["warnings"] == [r.getMessage() for r in caplog.records]


def test_a_missing_label_in_a_numeric_column_is_dropped_and_the_class_names_stay_whole(tmp_path):
    path = tmp_path / "numeric.csv"
    texts = toy_corpus(20)["text"]
    lines = [f"{t},{i % 2}" for i, t in enumerate(texts)] + ["no label here,"]  # the last row is line 62
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    raw = load_raw_dataset(str(path))
    assert raw.label_names == ["0", "1"]  # not "0.0", "1.0"
    meta = prepare_splits(raw, DataParams(), seed=0).meta
    assert meta["dropped"]["missing_label"] == {"train": {"count": 1, "lines": [62]}}
    assert meta["stratified"] == {"test": True, "validation": True}  # the missing label did not turn it off


def test_a_split_that_cannot_be_stratified_is_said_to_be_random():
    frame = toy_raw(10).splits["train"]
    frame = pd.concat([frame[frame["label"] < 2], pd.DataFrame({"text": ["a lone film"], "label": [2]})])
    meta = prepare_splits(RawDataset({"train": frame}, ["film", "money", "sport"], "toy"), DataParams(), 0).meta
    assert meta["stratified"]["test"] is False
    assert meta["warnings"][0].startswith(
        "the test split carved from train was chosen at random, not stratified by label: The least populated "
        "class in label column has only 1 member")  # the rest is datasets' own wording


# ---------------------------------------------------------------- a bad source keeps the last good data


def test_a_source_that_fails_the_checks_leaves_the_prepared_folder_as_it_was(tmp_path):
    paths = Artifacts(BaseParams(prepared_dir=tmp_path / "data" / "prepared"))
    write_prepared(prepare_splits(toy_raw(), DataParams(), seed=0), paths.prepared)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths.prepared.iterdir()}
    small = tmp_path / "small.csv"
    toy_corpus(5).to_csv(small, index=False)  # 15 rows: fewer than validate.min_train_rows (50)
    with pytest.raises(DataValidationError, match="at least 50 rows"):
        prepare_data.fn(DataParams(source=str(small)), ValidateParams(), paths, 0, "no-run")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths.prepared.iterdir()} == before
    assert sorted(p.name for p in paths.prepared.parent.iterdir()) == ["prepared"]  # no temp folder left


# ---------------------------------------------------------------- damaged weights


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])  # cut inside the header, as an interrupted copy leaves it


def test_a_truncated_safetensors_file_is_a_model_source_error_naming_it(tmp_path):
    folder = build_tiny_bert(tmp_path / "teacher-source", num_labels=2)
    weights = folder / "model.safetensors"
    _truncate(weights)
    expected = rf"{weights} is truncated or corrupt \(SafetensorError: .*invalid header length\)\. Re-download"
    with pytest.raises(ModelSourceError, match=expected):  # teacher.model pointing at the folder
        load_tokenizer_and_classifier(str(folder), ["a", "b"], max_length=32)
    with pytest.raises(ModelSourceError, match=expected):  # one of our folders, via transformers
        load_classifier(folder)
    with pytest.raises(ModelSourceError, match=expected):  # evaluation's runner
        open_model(folder)


def test_a_truncated_restructured_checkpoint_is_a_model_source_error_naming_it(tmp_path):
    folder = build_tiny_bert(tmp_path / "pruned", num_labels=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, FFN_KEY: [37, 37]}))  # rebuilt by our loader
    assert load_classifier(folder).config.num_labels == 2
    _truncate(folder / "model.safetensors")
    with pytest.raises(ModelSourceError, match=rf"{folder / 'model.safetensors'} is truncated or corrupt"):
        load_classifier(folder)


# ---------------------------------------------------------------- unwritable outputs


def _file_in_the_way(folder: Path) -> Path:
    """A regular file where the folder should be: no one, root included, can create files in it."""
    folder.write_text("not a folder")
    return folder


def _immutable(folder: Path) -> Path:
    """``chattr +i``: root cannot write there either (mode bits it ignores); needs ext4-like filesystems."""
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    return folder


@pytest.mark.parametrize("block", [_file_in_the_way, _immutable])
def test_an_unwritable_models_folder_stops_the_teacher_before_training(tmp_path, monkeypatch, block):
    models = block(tmp_path / "models")
    monkeypatch.setattr(teacher_task, "train_teacher", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(teacher_task, "load_prepared", lambda *a, **k: pytest.fail("work started"))
    paths = Artifacts(BaseParams(models_dir=models, checkpoints_dir=tmp_path / "checkpoints"))
    try:
        with pytest.raises(OutputError) as caught:
            teacher_task.train_teacher_task.fn(TeacherParams(), paths, 0, "no-run")
    finally:
        subprocess.run(["chattr", "-i", str(models)], capture_output=True)
    assert str(caught.value).startswith(f"Cannot write to {models}: ")
    assert str(caught.value).endswith("or point base.models_dir in params.yaml at a writable folder.")
    assert OutputError.exit_code == 9 and not list(tmp_path.glob("**/.bertshrink-write-check*"))


def test_an_unwritable_data_folder_stops_prepare_before_reading_the_source(tmp_path):
    paths = Artifacts(BaseParams(prepared_dir=_file_in_the_way(tmp_path / "data") / "prepared"))
    with pytest.raises(OutputError, match=r"data is a file, not a folder\..* point base.prepared_dir in params"):
        prepare_data.fn(DataParams(source=str(tmp_path / "not-read.csv")), ValidateParams(), paths, 0, "no-run")


def test_writable_outputs_pass_and_leave_nothing(tmp_path):
    paths = Artifacts(BaseParams(models_dir=tmp_path / "models"))
    paths.require_writable(paths.teacher.parent, paths.candidate("small").parent)  # not created yet: fine
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- through the command line


@pytest.mark.slow
def test_prepare_on_a_one_row_file_exits_3_with_the_message(tmp_path):
    (tmp_path / "one.csv").write_text("text,label\nhello world,pos\n")
    (tmp_path / "params.yaml").write_text("data:\n  source: one.csv\n")
    done = run_module(["-m", "flows.prepare"], tmp_path)
    assert done.returncode == DataSourceError.exit_code == 3
    assert "bertshrink: DataSourceError: one.csv has 1 labelled training row; carving test (15%)" in done.stderr
    assert not (tmp_path / "data" / "prepared").exists()
