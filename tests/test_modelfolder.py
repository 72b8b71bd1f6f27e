"""The one model-folder API: ``write_folder`` (atomic), ``ModelMeta`` (strict), ``read_meta`` /
``update_meta``, and ``open_model`` choosing a runner from what a folder holds."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from bertshrink.config.params import FloorParams
from bertshrink.errors import MissingArtifactError, ModelSourceError
from bertshrink.evaluation.floor import save_floor, train_floor
from bertshrink.modelfolder.files import CONFIG_FILE, FLOOR_FILE, META_FILE, ONNX_FILE, SAFETENSORS_FILE
from bertshrink.modelfolder.meta import (ModelMeta, meta_path, read_meta, read_meta_or_default, update_meta,
                                         write_folder)
from bertshrink.modelfolder.runners import OnnxClassifier, SklearnClassifier, TorchClassifier, open_model
from conftest import build_tiny_bert

TEACHER_META = {"kind": "teacher", "label_names": ["film", "money", "sport"], "max_length": 32, "seed": 3}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write_text_folder(target: Path, text: str, **meta) -> Path:
    def fill(tmp: Path) -> ModelMeta:
        (tmp / "weights.txt").write_text(text)
        return ModelMeta(**meta)

    return write_folder(target, fill)


# --------------------------------------------------------------------------- write_folder


def test_write_folder_writes_the_files_and_stamps_the_metadata_last(tmp_path):
    target = write_text_folder(tmp_path / "model", "v1", kind="candidate", recipe="int8")
    assert sorted(p.name for p in target.iterdir()) == [META_FILE, "weights.txt"]
    meta = read_meta(target)
    assert (meta.kind, meta.recipe, meta.format) == ("candidate", "int8", "pytorch")
    assert datetime.fromisoformat(meta.created_at).tzinfo is not None
    assert hidden_leftovers(tmp_path) == []


def test_write_folder_replaces_a_previous_folder_whole(tmp_path):
    target = write_text_folder(tmp_path / "model", "v1", kind="candidate")
    (target / "stale.bin").write_bytes(b"from an earlier run")
    write_text_folder(target, "v2", kind="teacher")
    assert sorted(p.name for p in target.iterdir()) == [META_FILE, "weights.txt"]  # stale.bin is gone
    assert (target / "weights.txt").read_text() == "v2" and read_meta(target).kind == "teacher"
    assert hidden_leftovers(tmp_path) == []


def test_write_folder_is_atomic_when_the_fill_fails(tmp_path):
    target = write_text_folder(tmp_path / "model", "v1", kind="teacher", seed=1)
    before = snapshot(target)

    def half_written(tmp: Path) -> ModelMeta:
        (tmp / "weights.txt").write_text("half of v2")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        write_folder(target, half_written)
    assert snapshot(target) == before  # the previous folder is untouched
    assert hidden_leftovers(tmp_path) == []  # and no .model.* temp folder is left behind


def test_write_folder_refuses_bad_metadata_before_touching_the_target(tmp_path):
    target = write_text_folder(tmp_path / "model", "v1", kind="teacher")
    before = snapshot(target)

    def typo_in_producer(tmp: Path) -> ModelMeta:
        (tmp / "weights.txt").write_text("v2")
        return ModelMeta(**{"kind": "teacher", "creatd": "yesterday"})

    with pytest.raises(ValidationError, match=r"creatd\n  Extra inputs are not permitted"):
        write_folder(target, typo_in_producer)
    assert snapshot(target) == before and hidden_leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path):
    def fail(tmp: Path) -> ModelMeta:
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError, match="export crashed"):
        write_folder(tmp_path / "model", fail)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- ModelMeta


def test_model_meta_refuses_an_unknown_key_by_name():
    with pytest.raises(ValidationError, match=r"created\n  Extra inputs are not permitted"):
        ModelMeta(kind="floor", created="2024-01-01T00:00:00+00:00")
    with pytest.raises(ValidationError, match=r"label_name\n  Extra inputs are not permitted"):
        ModelMeta(kind="teacher").updated(label_name=["a", "b"])


def test_model_meta_refuses_an_unknown_kind_or_format():
    with pytest.raises(ValidationError, match=r"kind\n  Input should be 'teacher', 'distilled', 'candidate'"):
        ModelMeta(kind="student")
    with pytest.raises(ValidationError, match=r"format\n  Input should be 'pytorch', 'onnx' or 'sklearn'"):
        ModelMeta(format="tflite")


def test_read_meta_refuses_a_file_with_an_unknown_key(tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({"kind": "teacher", "labels": ["a"]}))
    with pytest.raises(ValidationError, match=r"labels\n  Extra inputs are not permitted"):
        read_meta(tmp_path)


def test_format_label_and_torch_quantized():
    assert ModelMeta().format_label == "pytorch" and not ModelMeta().torch_quantized
    static = ModelMeta(format="onnx", quantization={"backend": "onnxruntime", "mode": "static"})
    assert static.format_label == "onnx static" and not static.torch_quantized
    int8 = ModelMeta(quantization={"backend": "torch", "mode": "int8_dynamic"})
    assert int8.format_label == "pytorch int8_dynamic" and int8.torch_quantized


# --------------------------------------------------------------------------- read_meta / update_meta


def test_read_meta_without_metadata_names_the_teacher_stage(tmp_path):
    plain = build_tiny_bert(tmp_path / "plain", num_labels=2)  # save_pretrained only: no bertshrink.json
    with pytest.raises(MissingArtifactError, match=r"bertshrink.json missing\). Run the teacher stage first") as err:
        read_meta(plain)
    assert "python -m flows.teacher" in str(err.value) and str(plain) in str(err.value)
    assert read_meta_or_default(plain) == ModelMeta(kind="model", format="pytorch")


def test_metadata_round_trips_through_a_model_folder(tmp_path):
    folder = build_tiny_bert(tmp_path / "teacher", num_labels=3, meta=TEACHER_META)
    meta = read_meta(folder)
    assert meta.model_dump(exclude_none=True, exclude={"created_at"}) == {**TEACHER_META, "format": "pytorch"}
    assert {SAFETENSORS_FILE, CONFIG_FILE, META_FILE, "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_update_meta_changes_one_field_and_keeps_the_others(tmp_path):
    folder = build_tiny_bert(tmp_path / "teacher", num_labels=3, meta=TEACHER_META)
    before, files_before = read_meta(folder), snapshot(folder)

    returned = update_meta(folder, training_run_id="abc123")

    after = read_meta(folder)
    assert returned == after
    assert after.training_run_id == "abc123"
    assert after.model_dump(exclude={"training_run_id"}) == before.model_dump(exclude={"training_run_id"})
    assert after.created_at == before.created_at  # an update is not a new folder
    changed = {name for name in files_before if snapshot(folder).get(name) != files_before[name]}
    assert changed == {META_FILE}
    assert sorted(p.name for p in folder.iterdir()) == sorted(files_before)  # no .json.tmp left


def test_update_meta_refuses_an_unknown_key_and_keeps_the_file(tmp_path):
    folder = build_tiny_bert(tmp_path / "teacher", num_labels=3, meta=TEACHER_META)
    text = meta_path(folder).read_text()
    with pytest.raises(ValidationError, match=r"run_id\n  Extra inputs are not permitted"):
        update_meta(folder, run_id="abc123")
    assert meta_path(folder).read_text() == text


# --------------------------------------------------------------------------- the floor's folder


@pytest.fixture(scope="module")
def floor_dir(prepared, tmp_path_factory) -> Path:
    params = FloorParams(c_values=(1.0,))
    pipeline, search = train_floor(prepared, params, seed=0)
    return save_floor(pipeline, prepared, params, search, tmp_path_factory.mktemp("floor") / "floor")


def test_floor_metadata_has_created_at_like_every_other_folder(floor_dir, prepared, tmp_path):
    teacher = build_tiny_bert(tmp_path / "teacher", num_labels=3, meta=TEACHER_META)
    floor_raw = json.loads((floor_dir / META_FILE).read_text())
    teacher_raw = json.loads((teacher / META_FILE).read_text())
    assert "created_at" in floor_raw and "created" not in floor_raw
    assert "created_at" in teacher_raw and "created" not in teacher_raw
    assert datetime.fromisoformat(floor_raw["created_at"]).tzinfo is not None
    floor = read_meta(floor_dir)  # the floor's metadata is a ModelMeta like the teacher's
    assert (floor.kind, floor.format, floor.label_names) == ("floor", "sklearn", prepared.label_names)
    assert floor.data_content_hash == prepared.content_hash and floor.chosen_c == 1.0


# --------------------------------------------------------------------------- open_model


def add_sum_of_ids_graph(folder: Path, weights: list[float]) -> None:
    """A hand-made ``model.onnx``: logits = (sum of input ids) * weights, one column per label."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["ids", "axes"], ["total"], keepdims=1),
         helper.make_node("MatMul", ["total", "w"], ["logits"])],
        "sum_of_ids",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(weights)])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("w", TensorProto.FLOAT, [1, len(weights)], weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / ONNX_FILE))


def test_open_model_runs_pytorch_weights_with_torch(tmp_path):
    folder = build_tiny_bert(tmp_path / "torch", num_labels=3, meta=TEACHER_META)
    runner = open_model(folder)
    assert isinstance(runner, TorchClassifier)
    assert runner.num_labels == 3 and runner.predict(["goal match", "market price"], 2, 16).shape == (2,)


def test_open_model_prefers_the_onnx_graph_over_torch_weights(tmp_path):
    folder = build_tiny_bert(tmp_path / "export", num_labels=3)
    add_sum_of_ids_graph(folder, [1.0, 0.0, -1.0])
    assert (folder / SAFETENSORS_FILE).is_file()  # an export folder may keep the torch weights too

    runner = open_model(folder, threads=1)

    assert isinstance(runner, OnnxClassifier) and runner.num_labels == 3
    texts = ["goal match team", "the"]
    ids = [runner.tokenizer(t)["input_ids"] for t in texts]
    assert all(runner.tokenizer.unk_token_id not in row for row in ids)  # toy words are real tokens
    want = np.array([[sum(row), 0.0, -sum(row)] for row in ids])  # single texts: no padding in the sum
    got = np.concatenate([runner.logits([t], batch_size=1, max_length=16) for t in texts])
    np.testing.assert_allclose(got, want)


def test_open_model_runs_the_floor_with_sklearn(floor_dir, prepared):
    runner = open_model(floor_dir)
    assert isinstance(runner, SklearnClassifier)
    assert (floor_dir / FLOOR_FILE).is_file() and runner.num_labels == len(prepared.label_names)
    texts = prepared.splits["test"]["text"].tolist()
    accuracy = np.mean(runner.predict(texts, 8, 32) == prepared.splits["test"]["label"].to_numpy())
    assert accuracy >= 0.9  # keyword topics: a bag of words separates them


def test_open_model_refuses_folders_it_cannot_run(tmp_path):
    with pytest.raises(MissingArtifactError, match=r"nothing does not exist\. Train the teacher first"):
        open_model(tmp_path / "nothing")
    (tmp_path / "no-config").mkdir()
    with pytest.raises(MissingArtifactError, match="has no config.json"):
        open_model(tmp_path / "no-config")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / CONFIG_FILE).write_text("{}")
    with pytest.raises(ModelSourceError, match=r"Don't know how to run .*found \['config.json'\]"):
        open_model(tmp_path / "empty")


def test_a_killed_write_leaves_nothing_behind_at_the_next_write(tmp_path, caplog, monkeypatch):
    """Issue 13, row 5: a hidden temp folder a SIGKILL left beside the target goes at the next write."""
    from bertshrink.modelfolder.meta import ModelMeta, write_folder

    target = tmp_path / "models" / "teacher"
    stale = tmp_path / "models" / ".teacher.k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / "models" / ".teacher-onnx.x"  # another target's temp folder is not ours to remove
    other.mkdir()
    # Another library's logging setup earlier in the session may have disabled existing loggers.
    monkeypatch.setattr(logging.getLogger("bertshrink.modelfolder.files"), "disabled", False)
    with caplog.at_level("WARNING", logger="bertshrink.modelfolder.files"):
        write_folder(target, lambda tmp: ModelMeta(kind="teacher"))
    assert sorted(p.name for p in target.parent.iterdir()) == [".teacher-onnx.x", "teacher"]
    assert f"removed {stale}, left by an interrupted write" in caplog.text


def test_a_swap_killed_between_its_renames_gets_the_last_good_folder_back(tmp_path):
    from bertshrink.modelfolder.files import recover_leftovers

    backup = tmp_path / ".teacher.old"  # replace_dir moved the old folder aside, then was killed
    backup.mkdir()
    (backup / "model.safetensors").write_bytes(b"last good")
    done = recover_leftovers(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "model.safetensors").read_bytes() == b"last good" and not backup.exists()
    assert done == [f"restored {tmp_path / 'teacher'} from .teacher.old, left by an interrupted swap"]
    assert recover_leftovers(tmp_path / "teacher") == []  # nothing left to do


def test_source_config_reads_a_folder_and_refuses_an_unreachable_hub_at_once(tmp_path, monkeypatch):
    """Issue 13, row 8: the pipeline checks the teacher source before any work. A Hub id whose host
    does not resolve (``.invalid`` never does) fails on the name lookup, naming HF_HUB_OFFLINE."""
    from bertshrink.modelfolder.load import source_config

    folder = build_tiny_bert(tmp_path / "bert", num_labels=2)
    assert source_config(str(folder))["num_hidden_layers"] == 2
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.bertshrink-test.invalid")
    with pytest.raises(ModelSourceError, match="No network: hub.bertshrink-test.invalid cannot be resolved.*HF_HUB_OFFLINE=1"):
        source_config("bert-base-uncased")
