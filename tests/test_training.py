"""Teacher fine-tuning on the tiny BERT: it learns, resumes after an interruption, refuses NaN."""

from __future__ import annotations

import functools
import json
import logging
import shutil

import pytest
import torch
from transformers import TrainerCallback

from bertshrink.config.knobs import TrainingKnobs
from bertshrink.config.params import TeacherParams
from bertshrink.errors import TrainingError
from bertshrink.modelfolder.load import load_classifier, load_tokenizer_and_classifier
from bertshrink.modelfolder.meta import read_meta
from bertshrink.training.finetune import (_checkpoint_to_resume, fine_tune, fingerprint, layer_drop,
                                          newest_complete_checkpoint, train_teacher)


def tiny_params(tiny_bert, **kw) -> TeacherParams:
    base = dict(model=str(tiny_bert), max_length=32, epochs=2, batch_size=8, learning_rate=3e-3,
                logging_steps=1, save_steps=2, warmup_ratio=0.0)
    return TeacherParams(**{**base, **kw})


class StopAtStep(TrainerCallback):
    """Simulates a crash (Ctrl-C) right after a given step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_train_teacher_saves_a_loadable_classifier(tmp_path, tiny_bert, prepared):
    params = tiny_params(tiny_bert, epochs=10)
    result = train_teacher(prepared, params, tmp_path / "teacher", tmp_path / "ckpt", seed=0,
                           extra_meta={"training_run_id": "abc"})
    meta = read_meta(result.model_dir)
    assert meta.kind == "teacher" and meta.source_model == str(tiny_bert) and meta.max_length == 32
    assert meta.label_names == prepared.label_names and meta.training_run_id == "abc"
    assert meta.data_content_hash == prepared.content_hash and meta.seed == 0
    assert meta.params["epochs"] == 10.0 and meta.params["learning_rate"] == 3e-3 and meta.params["save_steps"] == 2
    assert (result.model_dir / "model.safetensors").is_file()
    assert result.metrics["eval_accuracy"] >= 0.8  # keyword topics: chance is 1/3
    assert any("loss" in entry for entry in result.history)
    tokenizer, model = load_tokenizer_and_classifier(str(result.model_dir), prepared.label_names, 32)
    assert model.config.id2label[0] == prepared.label_names[0]
    assert tokenizer.model_max_length == 32


@pytest.mark.slow
def test_interrupted_run_resumes_from_last_checkpoint(tmp_path, tiny_bert, prepared):
    params = tiny_params(tiny_bert)  # save_steps=2, resume=True
    with pytest.raises(KeyboardInterrupt):
        train_teacher(prepared, params, tmp_path / "teacher", tmp_path / "ckpt", seed=0, callbacks=[StopAtStep(5)])
    assert not (tmp_path / "teacher").exists()  # nothing half-saved
    assert (tmp_path / "ckpt" / "checkpoint-4").is_dir()
    result = train_teacher(prepared, params, tmp_path / "teacher", tmp_path / "ckpt", seed=0)
    assert result.resumed_from.endswith("checkpoint-4")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    assert not (tmp_path / "ckpt").exists()  # spent once the model is saved


def test_a_checkpoint_cut_short_is_set_aside_and_the_newest_complete_one_resumed(tmp_path, caplog, monkeypatch):
    """A kill while saving leaves checkpoint-N without (or with a truncated) trainer_state.json."""
    work = tmp_path / "ckpt"
    for step, state in ((2, '{"global_step": 2}'), (4, None), (6, '{"global_st')):
        (work / f"checkpoint-{step}").mkdir(parents=True)
        (work / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (work / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    # Another library's logging setup earlier in the session may have disabled existing loggers.
    monkeypatch.setattr(logging.getLogger("bertshrink.training.finetune"), "disabled", False)
    with caplog.at_level("WARNING", logger="bertshrink.training.finetune"):
        assert newest_complete_checkpoint(work) == str(work / "checkpoint-2")
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-2", "incomplete-checkpoint-4",
                                                      "incomplete-checkpoint-6"]
    assert "checkpoint-6 was cut short" in caplog.text and "checkpoint-4 was cut short" in caplog.text
    assert newest_complete_checkpoint(tmp_path / "ckpt") == str(work / "checkpoint-2")  # stable on rerun
    (work / "checkpoint-2" / "trainer_state.json").unlink()
    assert newest_complete_checkpoint(work) is None  # nothing complete: start over, not crash


@pytest.mark.slow
def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path, tiny_bert, prepared):
    params = tiny_params(tiny_bert)  # save_steps=2, resume=True
    with pytest.raises(KeyboardInterrupt):
        train_teacher(prepared, params, tmp_path / "teacher", tmp_path / "ckpt", seed=0, callbacks=[StopAtStep(5)])
    # what a SIGKILL during the next save leaves: the weights written, trainer_state.json not yet
    shutil.copytree(tmp_path / "ckpt" / "checkpoint-4", tmp_path / "ckpt" / "checkpoint-6")
    (tmp_path / "ckpt" / "checkpoint-6" / "trainer_state.json").unlink()
    result = train_teacher(prepared, params, tmp_path / "teacher", tmp_path / "ckpt", seed=0)
    assert result.resumed_from.endswith("checkpoint-4")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()


def test_checkpoints_of_other_params_are_not_resumed(tmp_path, tiny_bert, prepared):
    def params(**kw) -> dict:
        return tiny_params(tiny_bert, **kw).model_dump(mode="json")

    work = tmp_path / "ckpt"
    old = fingerprint(params(), prepared.content_hash, 0)
    assert len(old) == 16 and fingerprint(params(), prepared.content_hash, 0) == old  # deterministic
    _checkpoint_to_resume(work, old, resume=True)
    (work / "checkpoint-2").mkdir()
    (work / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert _checkpoint_to_resume(work, old, resume=True).endswith("checkpoint-2")  # same run: resumed
    new = fingerprint(params(learning_rate=1e-3), prepared.content_hash, 0)
    assert new != old
    assert fingerprint(params(), "other-data-hash", 0) != old
    assert fingerprint(params(), prepared.content_hash, 1) != old
    assert _checkpoint_to_resume(work, new, resume=True) is None
    assert not (work / "checkpoint-2").exists()
    assert json.loads((work / "bertshrink-fingerprint.json").read_text())["fingerprint"] == new


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_model(tmp_path, tiny_bert, prepared, monkeypatch):
    good = train_teacher(prepared, tiny_params(tiny_bert, epochs=1), tmp_path / "teacher", tmp_path / "ckpt", seed=0)
    before = (good.model_dir / "model.safetensors").read_bytes()

    from transformers import BertForSequenceClassification

    original = BertForSequenceClassification.forward

    @functools.wraps(original)  # Trainer inspects forward's signature to pick columns
    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(BertForSequenceClassification, "forward", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 0"):
        train_teacher(prepared, tiny_params(tiny_bert, epochs=1, learning_rate=1e-3), tmp_path / "teacher",
                      tmp_path / "ckpt", seed=0)
    assert (good.model_dir / "model.safetensors").read_bytes() == before


def test_gpu_precision_on_cpu_is_refused(tmp_path, tiny_bert, prepared):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TrainingError, match="precision=bf16 needs a GPU"):
        train_teacher(prepared, tiny_params(tiny_bert, precision="bf16"), tmp_path / "t", tmp_path / "c", seed=0)
    with pytest.raises(TrainingError, match="precision=fp16 needs a GPU"):
        fine_tune(prepared, str(tiny_bert), TrainingKnobs(precision="fp16"), tmp_path / "t", tmp_path / "c", seed=0,
                  max_length=32)
    assert not (tmp_path / "t").exists()


def _layer_skips(model, probability: float, calls: int) -> tuple[int, int]:
    """How many layer calls passed their input through unchanged, of how many."""
    skipped, total = 0, 0

    def count(module, args, output):
        nonlocal skipped, total
        total += 1
        skipped += int(torch.equal(output, args[0]))

    inputs = {"input_ids": torch.randint(5, 50, (2, 8))}
    with layer_drop(model, probability):
        # registered after LayerDrop's hooks, so it sees their (possibly replaced) output
        handles = [layer.register_forward_hook(count) for layer in model.bert.encoder.layer]
        with torch.no_grad():
            for _ in range(calls):
                model(**inputs)
        for handle in handles:
            handle.remove()
    return skipped, total


def test_layerdrop_skips_layers_in_training_only(tiny_bert):
    torch.manual_seed(0)
    model = load_classifier(tiny_bert)
    model.train()
    skipped, total = _layer_skips(model, 0.5, calls=100)
    assert total == 100 * model.config.num_hidden_layers
    assert 0.35 < skipped / total < 0.65
    model.eval()
    assert _layer_skips(model, 0.5, calls=10)[0] == 0  # inference uses every layer
    model.train()
    assert _layer_skips(model, 0.0, calls=10)[0] == 0  # off by default
    # the hooks are gone afterwards: a plain training-mode forward drops nothing
    assert not any(layer._forward_hooks for layer in model.bert.encoder.layer)


@pytest.mark.slow
def test_teacher_training_applies_layerdrop(tmp_path, tiny_bert, prepared):
    """Same seed, same data: only LayerDrop differs, so the trained weights must differ."""
    runs = {p: train_teacher(prepared, tiny_params(tiny_bert, epochs=1, layerdrop=p), tmp_path / f"t{p}",
                             tmp_path / f"ckpt{p}", seed=0).model_dir for p in (0.0, 0.5)}
    assert read_meta(runs[0.5]).params["layerdrop"] == 0.5
    plain, dropped = (load_classifier(runs[p]).state_dict() for p in (0.0, 0.5))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(plain[key], dropped[key])


class CheckpointsAtTrainEnd(TrainerCallback):
    """Records the checkpoint folders the work dir holds when training ends."""

    def __init__(self, work_dir):
        self.work_dir, self.seen = work_dir, None

    def on_train_end(self, args, state, control, **kwargs):
        self.seen = sorted(p.name for p in self.work_dir.glob("checkpoint-*"))


@pytest.mark.slow
def test_fine_tune_of_a_source_with_plain_knobs(tmp_path, tiny_bert, prepared):
    """A recipe step's fine-tuning: a source folder and the training knobs, no checkpoints, no resume."""
    knobs = TrainingKnobs(epochs=1, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1)
    spy = CheckpointsAtTrainEnd(tmp_path / "work")
    result = fine_tune(prepared, str(tiny_bert), knobs, tmp_path / "out", tmp_path / "work", 0, 32,
                       extra_meta={"recipe": "r1"}, callbacks=[spy])
    # NO_CHECKPOINTS: of 8 steps only the last is saved (transformers always saves at the end of training)
    assert spy.seen == ["checkpoint-8"]
    assert result.resumed_from is None and not (tmp_path / "work").exists()
    meta = read_meta(result.model_dir)
    assert meta.kind == "teacher" and meta.recipe == "r1" and meta.source_model == str(tiny_bert)
    assert meta.max_length == 32 and meta.label_names == prepared.label_names
    assert meta.params == knobs.model_dump(mode="json")
    assert meta.params["epochs"] == 1.0 and "save_steps" not in meta.params
    # one epoch of 60 rows in batches of 8
    assert max(h.get("step", 0) for h in result.history) == 8
    assert load_classifier(result.model_dir).config.num_labels == len(prepared.label_names)


def test_a_single_label_never_gets_a_regression_head(tmp_path, tiny_bert, prepared):
    """One label is refused before any training; two or more get a softmax classification head."""
    from bertshrink.data.prepare import PreparedData
    from bertshrink.errors import ModelSourceError
    from bertshrink.modelfolder.load import load_tokenizer_and_classifier

    one_label = PreparedData(prepared.splits, ["sport"], prepared.meta)
    with pytest.raises(ModelSourceError, match="at least two labels; the data has 1"):
        train_teacher(one_label, tiny_params(tiny_bert), tmp_path / "teacher", tmp_path / "ckpt", seed=0)
    assert not (tmp_path / "teacher").exists()
    _, model = load_tokenizer_and_classifier(str(tiny_bert), ["a", "b"], 32)
    assert model.config.problem_type == "single_label_classification" and model.config.num_labels == 2


def _padded_tokens(tiny_bert, tmp_path, group_by_length: bool) -> tuple[int, int]:
    """Padded and real tokens of one epoch of the Trainer's batches over texts of 1 to 48 words."""
    import pandas as pd
    from transformers import Trainer

    from bertshrink.training.finetune import build_trainer, tokenize_frame, training_arguments

    tokenizer, model = load_tokenizer_and_classifier(str(tiny_bert), ["a", "b"], 64)
    words = "goal match team coach league film actor money bank".split()
    frame = pd.DataFrame({"text": [" ".join(words[i % 9] for i in range(n)) for n in range(1, 49)] * 2,
                          "label": [0, 1] * 48})
    encoded = {"train": tokenize_frame(frame, tokenizer, 64), "validation": tokenize_frame(frame[:4], tokenizer, 64)}
    knobs = TrainingKnobs(batch_size=8, group_by_length=group_by_length)
    args = training_arguments(knobs, tmp_path / str(group_by_length), 0, {}, "cpu")
    padded = real = 0
    for batch in build_trainer(Trainer, model, args, encoded, tokenizer).get_train_dataloader():
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return padded, real


def test_group_by_length_batches_pad_less(tmp_path, tiny_bert):
    grouped, real = _padded_tokens(tiny_bert, tmp_path, group_by_length=True)
    shuffled, same_real = _padded_tokens(tiny_bert, tmp_path, group_by_length=False)
    assert real == same_real  # the same examples, once each
    # lengths 3..50 tokens: random batches of 8 pad to near the maximum; sorted mega-batches hardly pad
    assert grouped < 0.75 * shuffled
