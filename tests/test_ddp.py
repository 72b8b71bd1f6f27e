"""Multi-process training (DDP under torchrun, gloo on CPU): the knob, the launch, rank 0 alone
writing, sharded data, replicas in sync, a frozen teacher left unwrapped, and a crash reported."""

from __future__ import annotations

import math
import os

import pytest
from pydantic import ValidationError

from bertshrink.config.knobs import DistributedKnobs
from bertshrink.config.params import TeacherParams, parse_params
from bertshrink.config.recipes import DistillStep
from bertshrink.errors import ParamsError, TrainingError
from bertshrink.modelfolder.meta import read_meta
from bertshrink.modelfolder.runners import open_model
from bertshrink.training import ddp
from bertshrink.training.distill import distill
from bertshrink.training.finetune import train_teacher
from conftest import build_tiny_bert

TWO_GLOO = DistributedKnobs(processes=2, backend="gloo")
TEACHER_EPOCHS = 20
DISTILL_EPOCHS = 32  # the one-process test trains 8; a step here sees 2 batches, and the student starts random


# ------------------------------------------------------------------------------------ the knob


def test_distributed_knob_defaults_to_one_process():
    params = parse_params({})
    assert params.distributed == DistributedKnobs(processes=1, backend="auto")
    assert not ddp.wants_torchrun(params.distributed) and not ddp.wants_torchrun(None)
    assert ddp.wants_torchrun(TWO_GLOO) == ("LOCAL_RANK" not in os.environ)


@pytest.mark.parametrize("bad, key", [({"processes": 0}, "distributed.processes"),
                                      ({"processes": 65}, "distributed.processes"),
                                      ({"processes": 1.5}, "distributed.processes"),
                                      ({"backend": "mpi"}, "distributed.backend"),
                                      ({"nodes": 2}, "distributed.nodes")])
def test_distributed_knob_is_range_checked(bad, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params({"distributed": bad})
    with pytest.raises(ValidationError):
        DistributedKnobs(**bad)


def test_backend_follows_the_devices_and_nccl_needs_gpus():
    assert ddp.resolve_backend(DistributedKnobs(processes=2), gpus=0) == "gloo"
    assert ddp.resolve_backend(DistributedKnobs(processes=2), gpus=2) == "nccl"
    assert ddp.resolve_backend(DistributedKnobs(processes=2, backend="gloo"), gpus=8) == "gloo"
    with pytest.raises(TrainingError, match=r"needs 2 CUDA GPUs; 0 visible.*backend gloo"):
        ddp.resolve_backend(DistributedKnobs(processes=2, backend="nccl"), gpus=0)
    with pytest.raises(TrainingError, match=r"distributed.processes 4 needs 4 CUDA GPUs; 2 visible"):
        ddp.resolve_backend(DistributedKnobs(processes=4), gpus=2)


def test_a_torchrun_process_does_not_launch_again(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not ddp.wants_torchrun(TWO_GLOO)


def test_in_process_callbacks_are_refused_before_launching(tmp_path, prepared, tiny_bert):
    with pytest.raises(TrainingError, match="callbacks cannot be passed to torchrun's processes"):
        train_teacher(prepared, TeacherParams(model=str(tiny_bert)), tmp_path / "teacher", tmp_path / "ckpt", 0,
                      callbacks=[object()], distributed=TWO_GLOO)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ 2 processes, gloo


def _shard(rows: int, epochs: int, batch: int = 8, ranks: int = 2) -> int:
    """Examples one rank trains on: batches of the shuffled rows go to the ranks in turn, and
    accelerate fills the last round from the start so that every rank steps equally often.
    (One process would see ``rows * epochs``.)"""
    return math.ceil(rows / (ranks * batch)) * batch * epochs


def _accuracy(folder, prepared, split="validation") -> float:
    frame = prepared.splits[split]
    predicted = open_model(folder).predict(frame["text"].tolist(), batch_size=32, max_length=32)
    return float((predicted == frame["label"].to_numpy()).mean())


@pytest.mark.slow
def test_one_process_trains_here_on_every_row(tmp_path, prepared, tiny_bert):
    """processes: 1 trains in this process, as before the knob: no job folder, all rows each epoch."""
    params = TeacherParams(model=str(tiny_bert), max_length=32, epochs=2, batch_size=8, save_steps=10_000)
    result = train_teacher(prepared, params, tmp_path / "teacher", tmp_path / "ckpt", 0,
                           distributed=DistributedKnobs(processes=1, backend="gloo"))
    assert result.distributed["world_size"] == 1 and result.distributed["backend"] is None
    assert result.distributed["examples_per_rank"] == [len(prepared.splits["train"]) * 2]
    assert result.distributed["trained_module"] == "BertForSequenceClassification"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


@pytest.fixture(scope="module")
def ddp_teacher(tmp_path_factory, prepared):
    """conftest's toy teacher (``train_tiny_teacher``'s knobs), fine-tuned by 2 gloo processes:
    (root folder, TrainResult)."""
    root = tmp_path_factory.mktemp("ddp-teacher")
    encoder = build_tiny_bert(root.parent / f"{root.name}-encoder", layers=4, heads=4, intermediate=64)
    params = TeacherParams(model=str(encoder), max_length=32, epochs=TEACHER_EPOCHS, batch_size=8, learning_rate=3e-3,
                           warmup_ratio=0.0, save_steps=10_000, logging_steps=50)
    return root, train_teacher(prepared, params, root / "teacher", root / "ckpt", 0,
                               extra_meta={"training_run_id": "run-x"}, distributed=TWO_GLOO)


@pytest.mark.slow
def test_teacher_trains_in_two_processes_and_rank0_alone_writes(ddp_teacher, prepared):
    root, result = ddp_teacher
    info = result.distributed
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["trained_module"] == "DistributedDataParallel"
    # Each rank trained on its half of every epoch, not on all of it.
    rows = len(prepared.splits["train"])
    assert info["examples_per_rank"] == [_shard(rows, TEACHER_EPOCHS)] * 2
    w0, w1 = info["weight_sum_per_rank"]
    assert w0 == pytest.approx(w1, rel=1e-9, abs=1e-9)  # the replicas ended identical
    # One model folder; the checkpoints are gone; the job folder keeps job, result and log.
    assert sorted(p.name for p in root.iterdir()) == ["ckpt.ddp", "teacher"]
    assert {"job.json", "result.json", "torchrun.log"} <= {p.name for p in (root / "ckpt.ddp").iterdir()}
    meta = read_meta(root / "teacher")
    assert meta.kind == "teacher" and meta.training_run_id == "run-x" and meta.label_names == prepared.label_names
    accuracy = _accuracy(root / "teacher", prepared)
    assert accuracy == pytest.approx(result.metrics["eval_accuracy"], abs=1e-9)
    assert accuracy >= 0.8, accuracy


@pytest.mark.slow
def test_distill_in_two_processes_keeps_the_teacher_unwrapped(tmp_path, ddp_teacher, prepared):
    """A narrower student (TinyBERT projections outside the DDP module, averaged by hooks)."""
    teacher_dir = ddp_teacher[0] / "teacher"
    small = build_tiny_bert(tmp_path / "small", num_labels=3, seed=1, hidden=16, layers=2, heads=2, intermediate=20)
    step = DistillStep(epochs=DISTILL_EPOCHS, learning_rate=3e-3, batch_size=8, warmup_ratio=0.0, logging_steps=5,
                       alpha_ce=0.5, alpha_kd=0.5, alpha_hidden=1.0, alpha_embedding=1.0)
    result = distill(teacher_dir, prepared, step, tmp_path / "student", tmp_path / "work", max_length=32, seed=0,
                     student_dir=small, distributed=TWO_GLOO)
    info = result.distributed
    assert info["world_size"] == 2 and info["trained_module"] == "DistributedDataParallel"
    assert info["teacher_module"] == "BertForSequenceClassification"  # frozen, not wrapped in DDP
    assert info["examples_per_rank"] == [_shard(len(prepared.splits["train"]), DISTILL_EPOCHS)] * 2
    w0, w1 = info["weight_sum_per_rank"]  # student and projections alike
    assert w0 == pytest.approx(w1, rel=1e-9, abs=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small", "student", "work.ddp"]
    assert read_meta(tmp_path / "student").kind == "distilled"
    teacher_predictions = open_model(teacher_dir).predict(prepared.splits["train"]["text"].tolist(), 32, 32)
    student_predictions = open_model(tmp_path / "student").predict(prepared.splits["train"]["text"].tolist(), 32, 32)
    assert (teacher_predictions == student_predictions).mean() >= 0.8


@pytest.mark.slow
def test_a_crashing_run_names_the_stage_and_the_log_and_keeps_the_old_model(tmp_path, prepared):
    old = tmp_path / "student"
    old.mkdir()
    (old / "marker").write_text("the last good model")
    step = DistillStep(student_layers=1, epochs=1)
    with pytest.raises(TrainingError) as caught:
        distill(tmp_path / "no-teacher", prepared, step, old, tmp_path / "work", max_length=32, seed=0,
                distributed=TWO_GLOO)
    message = str(caught.value)
    log = tmp_path / "work.ddp" / "torchrun.log"
    assert message.startswith("distill: DDP training on 2 processes (gloo) failed with exit code 1")
    assert str(log) in message and "no-teacher" in log.read_text()
    assert [p.name for p in old.iterdir()] == ["marker"] and (old / "marker").read_text() == "the last good model"
    assert not (tmp_path / "work.ddp" / "result.json").exists()
