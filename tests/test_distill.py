"""Distillation: the losses by hand, layer maps, cut-down students, and short distill() runs."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bertshrink.config.recipes import DistillStep
from bertshrink.modelfolder.meta import read_meta
from bertshrink.modelfolder.size import count_parameters
import bertshrink.training.distill as distill_module
from bertshrink.training.distill import distill, init_student_from_teacher, uniform_layer_map
from bertshrink.training.finetune import tokenize_frame
from bertshrink.training.teacher_logits import cached_teacher_logits
from bertshrink.training.losses import (attention_loss, embedding_mse_loss, hidden_mse_loss, kd_logits_loss,
                                        labelled_cross_entropy)
from conftest import build_tiny_bert, tiny_bert_model, toy_corpus, train_tiny_teacher


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on busy cores OpenMP spin-waits slow them 10x+."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ losses


def test_kd_loss_known_value():
    # One example, teacher logits [0, 0] -> p_t = [0.5, 0.5]; student logits [2*ln 3, 0] at T=2
    # -> s/T = [ln 3, 0] -> p_s = [3/4, 1/4].
    # KL(p_t || p_s) = 0.5*ln(0.5/0.75) + 0.5*ln(0.5/0.25) = 0.5*ln(2/3) + 0.5*ln 2 = 0.5*ln(4/3)
    # times T^2 = 4 -> 2*ln(4/3) = 0.575364...
    student = torch.tensor([[2 * math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])
    assert kd_logits_loss(student, teacher, 2.0).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-5)
    # batchmean: a batch of two identical rows has the same value.
    assert kd_logits_loss(student.repeat(2, 1), teacher.repeat(2, 1), 2.0).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-5)


def test_kd_loss_zero_when_equal_and_scales_with_t_squared():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert kd_logits_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.2, 0.3, -0.4]])
    # The KL part at T depends on s/T, t/T; feeding s*2, t*2 at T=2 gives the same KL as s, t at T=1,
    # so the documented T^2 factor is the only difference: exactly 4x.
    assert kd_logits_loss(2 * s, 2 * t, 2.0).item() == pytest.approx(4 * kd_logits_loss(s, t, 1.0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        kd_logits_loss(s, t, 0.0)


def test_kd_loss_gradient_step_moves_student_towards_teacher():
    teacher = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, 3.0]])
    student = torch.zeros(2, 3, requires_grad=True)
    before = kd_logits_loss(student, teacher, 2.0)
    before.backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert kd_logits_loss(stepped, teacher, 2.0).item() < before.item()
    assert torch.argmax(stepped, dim=-1).tolist() == [0, 2]


def test_cross_entropy_skips_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]], requires_grad=True)
    labels = torch.tensor([0, -100, 1])
    # row 0: -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.126928; row 2: -log(e^-5 / (e^5 + e^-5)) = 10 + log(1 + e^-10)
    # = 10.0000454; row 1 is unlabelled, so the mean is over two rows: 5.0634867.
    expected = (math.log1p(math.exp(-2.0)) + 10.0 + math.log1p(math.exp(-10.0))) / 2
    assert labelled_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert labelled_cross_entropy(logits, labels).item() == pytest.approx(5.0634867, rel=1e-6)
    only_transfer = labelled_cross_entropy(logits, torch.full((3,), -100))
    assert only_transfer.item() == 0.0
    only_transfer.backward()  # a batch of transfer texts alone still backpropagates (zero gradient)
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_hidden_and_embedding_mse():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    assert hidden_mse_loss(h, h.clone()).item() == 0.0
    assert embedding_mse_loss(h, h.clone()).item() == 0.0
    # Padding positions do not count when a mask is given.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = h.clone()
    noisy[0, 3:] += 100.0
    assert hidden_mse_loss(noisy, h, attention_mask=mask).item() == 0.0
    # unmasked, 2 of 10 positions are off by 100 in every dimension: 100^2 * 2/10 = 2000
    assert hidden_mse_loss(noisy, h).item() == pytest.approx(2000.0, rel=1e-5)
    # masked, the mean runs over the 8 real tokens: shifting all by 0.5 gives 0.25
    assert hidden_mse_loss(h + 0.5, h, attention_mask=mask).item() == pytest.approx(0.25, rel=1e-5)
    # Different widths: a projection student 4 -> teacher 8, and gradients reach it.
    student = torch.randn(2, 5, 4, generator=g)
    proj = nn.Linear(4, 8)
    loss = hidden_mse_loss(student, h, proj, mask)
    loss.backward()
    assert loss.item() > 0 and proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    emb_proj = nn.Linear(4, 8)
    embedding_mse_loss(student, h, emb_proj).backward()
    assert emb_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="projection"):
        hidden_mse_loss(student, h)


def test_attention_loss():
    attn = torch.softmax(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert attention_loss(attn, attn.clone()).item() == 0.0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert attention_loss(attn, attn.clone(), mask).item() == 0.0
    assert attention_loss(attn, attn.flip(-1), mask).item() > 0
    uniform, peaked = torch.full((1, 2, 3, 3), 1 / 3), torch.zeros(1, 2, 3, 3)
    peaked[..., 0] = 1.0
    # each row differs by (2/3)^2 + 2 * (1/3)^2 = 2/3 over 3 keys: a mean of 2/9
    assert attention_loss(peaked, uniform).item() == pytest.approx(2 / 9, rel=1e-5)
    # with the last token padding, only the 2x2 real (query, key) pairs count: (2/3)^2 + (1/3)^2 over 2 keys = 5/18
    assert attention_loss(peaked, uniform, torch.tensor([[1, 1, 0]])).item() == pytest.approx(5 / 18, rel=1e-5)
    with pytest.raises(ValueError, match="student has 2 heads, teacher has 4"):
        attention_loss(attn[:, :2], attn)


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(2, 6) == [2, 5]
    assert uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(1, 4) == [3]
    assert uniform_layer_map(4, 6) == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="more layers than the teacher"):
        uniform_layer_map(7, 6)
    with pytest.raises(ValueError, match="n_student"):
        uniform_layer_map(0, 6)
    with pytest.raises(ValueError, match="n_teacher"):
        uniform_layer_map(1, 0)


def test_distill_step_validation():
    step = DistillStep(student_layers=2)
    assert (step.temperature, step.alpha_ce, step.alpha_kd, step.epochs, step.learning_rate) == (2.0, 0.5, 0.5, 2.0, 1e-4)
    assert step.layer_map is None and not step.two_stage and not step.transfer
    for bad, message in [
        (dict(temperature=0), "temperature\n  Input should be greater than 0"),
        (dict(alpha_kd=-1), "alpha_kd\n  Input should be greater than or equal to 0"),
        (dict(student_layers=0), "student_layers\n  Input should be greater than or equal to 1"),
        (dict(epochs=0), "epochs\n  Input should be greater than 0"),
        (dict(batch_size=0), "batch_size\n  Input should be greater than or equal to 1"),
        (dict(teacher_layers=[]), "teacher_layers must be a non-empty list of layer indices >= 0 \\(got \\[\\]\\)"),
        (dict(layer_map=[-1]), "layer_map must be a non-empty list of layer indices >= 0 \\(got \\[-1\\]\\)"),
        (dict(teacher_layers=[1, 1]), "teacher_layers has repeats: \\[1, 1\\]"),
        (dict(two_stage=True), "two_stage needs alpha_hidden, alpha_attention or alpha_embedding > 0 for stage 1"),
        (dict(alpha_ce=0, alpha_kd=0), "at least one of alpha_ce, alpha_kd, alpha_hidden"),
        (dict(learning_rate=2.0), "learning_rate\n  Input should be less than 1"),
        (dict(student_layers=3, teacher_layers=[0, 1]), "give student_layers or teacher_layers, not both"),
        (dict(seed=0), "seed\n  Extra inputs are not permitted"),  # seed and max_length are distill()'s arguments
    ]:
        with pytest.raises(ValidationError, match=message):
            DistillStep(**bad)


# ------------------------------------------------------------------------------------ students


def test_init_student_from_teacher(tmp_path):
    teacher = tiny_bert_model(3)
    student = init_student_from_teacher(teacher, [1])
    assert student.config.num_hidden_layers == 1 and teacher.config.num_hidden_layers == 2
    assert count_parameters(student) < count_parameters(teacher)
    # one encoder layer at hidden 32, FFN 37: Q/K/V/O 4 * (32*32 + 32) + 2 LayerNorms 2 * 64 + FFN (32*37 + 37) + (37*32 + 32)
    assert count_parameters(teacher) - count_parameters(student) == 4 * (32 * 32 + 32) + 2 * 64 + 32 * 37 + 37 + 37 * 32 + 32
    s_state, t_state = student.state_dict(), teacher.state_dict()
    for name, value in s_state.items():
        source = name.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(value, t_state[source]), name
    student.save_pretrained(tmp_path / "student")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert loaded.config.num_hidden_layers == 1
    x = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(input_ids=x).logits, student.eval()(input_ids=x).logits, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        init_student_from_teacher(teacher, [2])
    with pytest.raises(ValueError, match="repeats"):
        init_student_from_teacher(teacher, [0, 0])


# ------------------------------------------------------------------------------------ distill()


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, prepared):
    """A 4-layer tiny BERT (toy vocab) fine-tuned to ~100% on the toy corpus."""
    root = tmp_path_factory.mktemp("distill")
    encoder = build_tiny_bert(root / "encoder4", layers=4)  # a bare encoder, as the packaged teacher source is
    result = train_tiny_teacher(encoder, prepared, root, logging_steps=50, save_steps=10_000)
    assert result.metrics["eval_accuracy"] >= 0.9
    return result.model_dir


def _predict(folder, texts):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        batch = tokenizer(list(texts), truncation=True, max_length=32, padding=True, return_tensors="pt")
        return model(**batch).logits.argmax(-1)


def _quick(**kw) -> DistillStep:
    base = dict(student_layers=2, epochs=8, learning_rate=3e-3, batch_size=8, warmup_ratio=0.0,
                logging_steps=5, alpha_ce=0.5, alpha_kd=0.5, alpha_hidden=1.0, alpha_attention=1.0)
    return DistillStep(**{**base, **kw})


def _distill(teacher_dir, prepared, step: DistillStep, output_dir, work_dir, **kw):
    return distill(teacher_dir, prepared, step, output_dir, work_dir, max_length=32, seed=0, **kw)


@pytest.mark.slow
def test_distill_needs_a_student_shape(tmp_path, trained_teacher, prepared):
    with pytest.raises(ValueError, match="distill needs student_layers or teacher_layers"):
        _distill(trained_teacher, prepared, DistillStep(), tmp_path / "student", tmp_path / "work")
    with pytest.raises(ValueError, match=r"distill.teacher_layers \[0, 4\] has indices outside 0..3"):
        _distill(trained_teacher, prepared, DistillStep(teacher_layers=[0, 4]), tmp_path / "student", tmp_path / "work")
    assert not (tmp_path / "student").exists()


@pytest.mark.slow
def test_distill_student_agrees_with_trained_teacher(tmp_path, trained_teacher, prepared):
    result = _distill(trained_teacher, prepared, _quick(), tmp_path / "student", tmp_path / "work")
    out = result.model_dir
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (tmp_path / "work").exists()
    meta = read_meta(out)
    assert meta.kind == "distilled" and meta.teacher_layers == [1, 3] and meta.layer_map == [1, 3]
    assert meta.label_names == prepared.label_names and meta.data_content_hash == prepared.content_hash
    assert meta.parameters_after < meta.parameters_before and meta.seed == 0
    assert meta.distill["alpha_attention"] == 1.0 and meta.distill["student_layers"] == 2 and meta.max_length == 32
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.metrics["train_loss"])
    keys = load_file(out / "model.safetensors").keys()
    assert not any("projection" in k for k in keys)
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    texts = prepared.splits["train"]["text"]
    agree = (_predict(out, texts) == _predict(trained_teacher, texts)).float().mean().item()
    assert agree >= 0.8, agree


@pytest.mark.slow
def test_distill_into_narrower_student_trains_projections_not_saved(tmp_path, trained_teacher, prepared, monkeypatch):
    """A student_dir with a different width: W_h/W_e are learned, and absent from the saved model."""
    import bertshrink.training.distill as distill_module

    small = dict(hidden=16, layers=2, heads=2, intermediate=20)  # the teacher's toy vocabulary, half its width
    build_tiny_bert(tmp_path / "small", num_labels=3, seed=1, **small)
    seen = {}
    original = distill_module.DistillationTrainer.train

    def spy(self, *a, **kw):
        before = {k: v.detach().clone() for k, v in self.projections.state_dict().items()}
        out = original(self, *a, **kw)
        seen["before"], seen["after"] = before, self.projections.state_dict()
        seen["components"] = dict(self.last_loss_components)
        return out

    monkeypatch.setattr(distill_module.DistillationTrainer, "train", spy)
    cfg = _quick(epochs=8, alpha_embedding=1.0, alpha_attention=0.5)
    result = _distill(trained_teacher, prepared, cfg, tmp_path / "student", tmp_path / "work",
                      student_dir=tmp_path / "small")
    assert set(seen["before"]) == {"hidden.weight", "hidden.bias", "embedding.weight", "embedding.bias"}
    assert all(not torch.equal(seen["before"][k], seen["after"][k].cpu()) for k in seen["before"])
    assert set(seen["components"]) == {"ce", "kd", "hidden", "attention", "embedding"}
    saved = load_file(result.model_dir / "model.safetensors")
    assert not any(k.startswith(("hidden.", "embedding.")) or "projection" in k for k in saved)
    assert set(saved) == set(tiny_bert_model(3, **small).state_dict())
    meta = read_meta(result.model_dir)
    assert meta.teacher_layers is None and meta.layer_map == [1, 3]  # uniform map of 2 student onto 4 teacher layers
    assert meta.student_dir == str(tmp_path / "small")
    # A randomly initialised, narrower student learns the teacher's decisions from distillation.
    texts = prepared.splits["train"]["text"]
    agree = (_predict(result.model_dir, texts) == _predict(trained_teacher, texts)).float().mean().item()
    assert agree >= 0.8, agree


@pytest.mark.slow
def test_distill_with_transfer_texts_trains_on_them(tmp_path, trained_teacher, prepared, monkeypatch):
    from dataclasses import replace

    import bertshrink.training.distill as distill_module

    with pytest.raises(ValueError, match="data.transfer_samples"):
        _distill(trained_teacher, prepared, _quick(transfer=True, epochs=1), tmp_path / "s0", tmp_path / "w0")
    extra = toy_corpus(20, seed=9)[["text"]]  # texts the labelled splits do not have
    with_transfer = replace(prepared, transfer=extra)
    seen = {}
    original = distill_module.with_transfer_texts

    def spy(train, *args):
        seen["before"], seen["after"] = len(train), original(train, *args)
        return seen["after"]

    monkeypatch.setattr(distill_module, "with_transfer_texts", spy)
    result = _distill(trained_teacher, with_transfer, _quick(transfer=True, alpha_ce=0.0, alpha_kd=1.0, epochs=2),
                      tmp_path / "student", tmp_path / "work")
    train = seen["after"]
    assert len(train) == seen["before"] + len(extra)
    assert sorted(set(train["labels"][seen["before"]:])) == [-100]
    assert math.isfinite(result.metrics["train_loss"])
    assert read_meta(result.model_dir).transfer_rows == len(extra) == 60


@pytest.mark.slow
def test_distill_with_augmentation_trains_on_new_teacher_labelled_texts(tmp_path, trained_teacher, prepared):
    from bertshrink.training.distill import augmented_texts

    step = _quick(augment={"copies": 2, "replace_prob": 0.5, "neighbours": 5, "min_words": 1},
                  alpha_ce=0.0, alpha_kd=1.0, epochs=1)
    result = _distill(trained_teacher, prepared, step, tmp_path / "student", tmp_path / "work")
    train_rows = len(prepared.splits["train"])
    texts = augmented_texts(prepared, step, AutoTokenizer.from_pretrained(trained_teacher),
                            AutoModelForSequenceClassification.from_pretrained(trained_teacher), seed=0)
    assert train_rows < len(texts) <= 2 * train_rows          # up to two new texts per training text
    assert not set(texts) & set(prepared.splits["train"]["text"])
    assert read_meta(result.model_dir).augmented_rows == len(texts)
    assert result.distributed["examples_per_rank"] == [train_rows + len(texts)]  # one epoch over both
    assert math.isfinite(result.metrics["train_loss"])


@pytest.mark.slow
def test_two_stage_runs(tmp_path, trained_teacher, prepared):
    # cut from teacher layers 0 and 2, but the intermediate losses learn from layers 1 and 3
    cfg = _quick(epochs=1, two_stage=True, teacher_layers=[0, 2], student_layers=None, layer_map=[1, 3])
    result = _distill(trained_teacher, prepared, cfg, tmp_path / "student", tmp_path / "work")
    stages = {h.get("stage") for h in result.history}
    assert stages == {"intermediate", "prediction"}
    assert "intermediate_train_loss" in result.metrics and math.isfinite(result.metrics["train_loss"])
    meta = read_meta(result.model_dir)
    assert meta.teacher_layers == [0, 2] and meta.layer_map == [1, 3] and meta.distill["two_stage"] is True
    assert AutoModelForSequenceClassification.from_pretrained(result.model_dir).config.num_hidden_layers == 2


# ------------------------------------------------------------------------------ cached teacher logits


def test_cached_teacher_logits_are_each_texts_own_logits(tmp_path, trained_teacher, prepared):
    """Computed in length-sorted padded batches, each row equals the teacher on that text alone."""
    tokenizer = AutoTokenizer.from_pretrained(trained_teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(trained_teacher).eval()
    encoded = tokenize_frame(prepared.splits["train"], tokenizer, 32)
    logits, reused = cached_teacher_logits(teacher, "fp", encoded, tokenizer, tmp_path / "cache")
    assert not reused and logits.shape == (len(prepared.splits["train"]), 3)
    with torch.no_grad():
        for i, text in enumerate(prepared.splits["train"]["text"][:12]):
            alone = teacher(**tokenizer(text, truncation=True, max_length=32, return_tensors="pt")).logits[0]
            torch.testing.assert_close(torch.from_numpy(logits[i]), alone, atol=1e-5, rtol=1e-4)
    again, reused = cached_teacher_logits(teacher, "fp", encoded, tokenizer, tmp_path / "cache")
    assert reused and (again == logits).all()
    # another teacher (fingerprint) or other inputs are other keys
    assert not cached_teacher_logits(teacher, "other", encoded, tokenizer, tmp_path / "cache")[1]
    assert not cached_teacher_logits(teacher, "fp", encoded.select(range(10)), tokenizer, tmp_path / "cache")[1]


@pytest.mark.slow
def test_distill_with_cached_logits_trains_as_with_the_live_teacher(tmp_path, trained_teacher, prepared, monkeypatch):
    """ce + kd only: the cached logits replace the teacher's forward pass and give the same student."""
    step = _quick(alpha_hidden=0.0, alpha_attention=0.0, epochs=2)
    cached = _distill(trained_teacher, prepared, step, tmp_path / "cached", tmp_path / "w1",
                      logits_cache_dir=tmp_path / "logits")
    assert len(list((tmp_path / "logits").glob("*.npy"))) == 1
    assert cached.metrics["train_teacher_passes"] == 0
    monkeypatch.setattr(distill_module, "_prediction_losses_only", lambda step: False)  # the live teacher, as before
    live = _distill(trained_teacher, prepared, step, tmp_path / "live", tmp_path / "w2")
    assert live.metrics["train_teacher_passes"] == 2 * math.ceil(len(prepared.splits["train"]) / 8)  # every step
    a, b = load_file(cached.model_dir / "model.safetensors"), load_file(live.model_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
