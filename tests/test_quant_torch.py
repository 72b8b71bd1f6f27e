"""Training-time quantization (Q8BERT QAT, Quant-Noise) and PyTorch post-training quantization
(torchao int8, fp16/bf16) on tiny random BERTs."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import AutoTokenizer, BertForSequenceClassification

from bertshrink.compression import prune
from bertshrink.compression.quantize_torch import quantize_torch
from bertshrink.errors import BertshrinkError, QuantizationError
from bertshrink.modelfolder.files import META_FILE, TORCH_QUANT_MODES
from bertshrink.modelfolder.load import load_classifier
from bertshrink.modelfolder.meta import ModelMeta, save_model_folder
from bertshrink.modelfolder.runners import TorchClassifier
from bertshrink.modelfolder.structure import encoder_linear_modules
from bertshrink.modelfolder.torch_quant import UnsupportedQuantizationError
from bertshrink.training import quant_training as qt
from conftest import build_tiny_bert, tiny_bert_model, toy_corpus

VOCAB = 60  # random_batch draws ids below this


def small_bert():
    """The conftest tiny BERT (3 labels, vocab 60) with dropout off, so training-mode forwards are deterministic."""
    return tiny_bert_model(3, vocab_size=VOCAB, dropout=0.0)


def random_batch(seed: int = 0, vocab: int = VOCAB) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.float()


def no_quantization_left(model) -> bool:
    return not any(parametrize.is_parametrized(m) or m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- fake quantization


def test_fake_quantize_gradient_is_identity():
    w = torch.randn(6, 10, requires_grad=True)
    upstream = torch.randn(6, 10)
    (qt.fake_quantize(w, bits=4) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantized_weight_has_few_levels_per_channel(bits, per_channel):
    w = torch.randn(5, 3000) * torch.tensor([0.01, 0.1, 1.0, 10.0, 0.0])[:, None]  # one all-zero row
    q = qt.fake_quantize(w, bits, per_channel).detach()
    assert all(len(row.unique()) <= 2 ** bits for row in q)
    assert torch.equal(q[4], torch.zeros(3000))
    # Symmetric rounding: every weight moves by at most half a step of its row's (or the tensor's) grid.
    max_abs = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    assert ((q - w).abs() <= max_abs / (2 ** (bits - 1) - 1) / 2 + 1e-6).all()


def test_bad_settings_raise_the_one_quantization_error():
    model = small_bert()
    with pytest.raises(QuantizationError, match=r"p must be in \[0, 1\], got 1.5"):
        with qt.quant_noise(model, p=1.5):
            pass
    with pytest.raises(QuantizationError, match="block_size must be a positive integer"):
        with qt.quant_noise(model, block_size=0):
            pass
    with pytest.raises(QuantizationError, match="bits must be an integer between 2 and 16"):
        qt.fake_quantize(torch.ones(2, 2), bits=1)
    with pytest.raises(QuantizationError, match=r"ema_decay must be in \(0, 1\)"):
        with qt.quantization_aware(model, ema_decay=1.0):
            pass
    with qt.quant_noise(model):  # stacking two weight quantizers is refused, and cleaned up
        with pytest.raises(QuantizationError, match="already have a weight parametrization"):
            with qt.quantization_aware(model):
                pass
    assert no_quantization_left(model)
    # One error class for every quantization step: a compression failure (exit code 8) and a ValueError.
    assert issubclass(QuantizationError, BertshrinkError) and issubclass(QuantizationError, ValueError)
    assert QuantizationError.exit_code == 8


# --------------------------------------------------------------------------- quant-noise


def test_quant_noise_p0_is_the_plain_model_and_p1_is_full_fake_quantization():
    model, batch = small_bert().train(), random_batch()
    plain = logits(model, batch)
    with qt.quant_noise(model, p=0.0):
        assert torch.equal(logits(model, batch), plain)
    query = model.bert.encoder.layer[0].attention.self.query
    latent = query.weight.detach().clone()
    with qt.quant_noise(model, p=1.0, bits=4):
        noisy = logits(model, batch)
        assert torch.equal(query.weight, qt.quantize_dequantize(latent, 4))
    with qt.quantization_aware(model, bits=4, quantize_activations=False):
        fake = logits(model, batch)
    torch.testing.assert_close(noisy, fake, rtol=0, atol=1e-6)
    assert not torch.equal(noisy, plain)


def test_quant_noise_applies_no_noise_in_eval_mode():
    model, batch = small_bert().eval(), random_batch()
    plain = logits(model, batch)
    with qt.quant_noise(model, p=1.0, bits=4):
        assert torch.equal(logits(model, batch), plain)


@pytest.mark.parametrize("cols,block_size", [(32, 8), (37, 8), (5, 8)])
def test_quant_noise_blocks_are_groups_of_input_columns(cols, block_size):
    torch.manual_seed(0)
    mask = qt._block_mask(torch.zeros(64, cols), p=0.5, block_size=block_size)
    assert mask.shape == (64, cols)
    for start in range(0, cols, block_size):  # one decision per block, the remainder is a block too
        block = mask[:, start:start + block_size]
        assert torch.equal(block, block[:, :1].expand_as(block))
    assert 0.2 < mask[:, ::block_size].float().mean() < 0.8


# --------------------------------------------------------------------------- Q8BERT


def test_qat_tracks_activation_ranges_in_training_and_freezes_them_in_eval():
    model = small_bert().train()
    with qt.quantization_aware(model) as ranges:
        logits(model, random_batch(0))
        trained = ranges.as_dict()
        assert len(trained) == len(encoder_linear_modules(model)) == 12
        model.eval()
        logits(model, random_batch(1))
        assert ranges.as_dict() == trained
    assert no_quantization_left(model)


@pytest.mark.parametrize("context", [
    lambda m: qt.quantization_aware(m),
    lambda m: qt.quantization_aware(m, bits=4, per_channel=False, quantize_activations=False),
    lambda m: qt.quant_noise(m, p=0.5, block_size=8, bits=4),
], ids=["qat8", "qat4-weights", "quant-noise"])
def test_training_inside_a_context_updates_the_fp32_weights_and_leaves_a_plain_model(tmp_path, context):
    model = small_bert().train()
    keys = list(model.state_dict())
    query = model.bert.encoder.layer[0].attention.self.query
    before = query.weight.detach().clone()
    weight_object = query.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with context(model):
        for step in range(3):
            loss = model(**random_batch(step)).loss
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert no_quantization_left(model)
    assert list(model.state_dict()) == keys
    assert query.weight is weight_object  # the optimizer's parameter is the model's weight again
    assert not torch.equal(query.weight, before)
    model.eval().save_pretrained(tmp_path)
    fresh = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(model, random_batch()), logits(fresh, random_batch()))


def test_weight_quantization_error_orders_bit_widths_and_is_zero_on_the_grid():
    model = small_bert()
    int8, int4 = qt.weight_quantization_error(model, 8), qt.weight_quantization_error(model, 4)
    assert 0 < int8 < int4 < 1
    with torch.no_grad():
        for module in encoder_linear_modules(model).values():
            module.weight.copy_(qt.quantize_dequantize(module.weight, 8))
    assert qt.weight_quantization_error(model, 8) < 1e-6


def test_round_weights_puts_encoder_weights_on_the_grid_and_leaves_the_rest():
    model = small_bert()
    head_before = model.classifier.weight.clone()
    embeddings_before = model.bert.embeddings.word_embeddings.weight.clone()
    assert qt.weight_quantization_error(model, 4) > 0.01
    assert qt.round_weights_(model, 4) == 12  # 2 layers x (q, k, v, attention out, FFN in, FFN out)
    assert qt.weight_quantization_error(model, 4) < 1e-6
    query = model.bert.encoder.layer[0].attention.self.query.weight
    assert query.unique(dim=None).numel() <= 15 * query.shape[0]  # at most 15 levels per row
    assert torch.equal(model.classifier.weight, head_before)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings_before)


# --------------------------------------------------------------------------- post-training (torch)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A hidden-64 classifier folder with the toy tokenizer and a bertshrink.json."""
    return build_tiny_bert(tmp_path_factory.mktemp("quant") / "fp32", num_labels=3,
                           meta={"kind": "teacher", "label_names": ["a", "b", "c"]},
                           hidden=64, heads=4, intermediate=128)


@pytest.fixture(scope="module")
def encoded(source):
    tokenizer = AutoTokenizer.from_pretrained(source)
    return dict(tokenizer(toy_corpus(10, seed=2)["text"].tolist(), padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    """Every mode applied once to ``source``: ``{mode: (folder, report)}``."""
    root = tmp_path_factory.mktemp("quantized")
    return {mode: (root / mode, quantize_torch(source, root / mode, mode)) for mode in TORCH_QUANT_MODES}


def assert_logits_close(mode, got, want):
    if mode.startswith("int8"):
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        torch.testing.assert_close(got, want, rtol=0, atol=0.05)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 if mode == "fp16" else 5e-2)


@pytest.mark.parametrize("mode", TORCH_QUANT_MODES)
def test_quantized_folder_is_smaller_loads_and_predicts_like_fp32(quantized, source, encoded, mode):
    folder, report = quantized[mode]
    assert report["backend"] == "torch" and report["mode"] == mode
    assert report["library"].startswith("torchao 0.18" if mode.startswith("int8") else "torch ")
    assert report["quantized_linear_count"] >= 12
    assert report["bytes_after"] < 0.6 * report["bytes_before"]
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["kind"] == "teacher" and meta["quantization"] == report
    model = load_classifier(folder)
    assert model.config.bertshrink_quantization == {"backend": "torch", "mode": mode}
    with torch.inference_mode():
        got = model(**encoded).logits.float()
    assert_logits_close(mode, got, logits(load_classifier(source), encoded))


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_weight_only"])
def test_int8_modes_hold_int8_weights_about_4x_smaller(quantized, source, mode):
    from torchao.quantization import Int8Tensor

    model = load_classifier(quantized[mode][0])
    linears = encoder_linear_modules(model)
    assert all(isinstance(m.weight, Int8Tensor) and m.weight.qdata.dtype == torch.int8 for m in linears.values())
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears.values())
    int8_bytes = sum(m.weight.qdata.nbytes + m.weight.scale.nbytes for m in linears.values())
    assert int8_bytes < 0.3 * fp32_bytes
    assert not isinstance(model.classifier.weight, Int8Tensor)  # head and embeddings stay fp32
    assert (quantized[mode][0] / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("mode,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_modes_keep_their_dtype_after_loading(quantized, mode, dtype):
    folder = quantized[mode][0]
    assert {p.dtype for p in load_classifier(folder).parameters()} == {dtype}
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["int8_dynamic", "bf16"])
def test_restructured_models_round_trip(tmp_path, source, encoded, mode):
    model, tokenizer = load_classifier(source), AutoTokenizer.from_pretrained(source)
    prune.prune_heads(model, {0: [1, 3], 1: [0]})
    prune.prune_ffn(model, 0.25)
    prune.factorize_embeddings(model, rank=16)
    save_model_folder(model, tokenizer, ModelMeta(kind="candidate"), tmp_path / "pruned")
    quantize_torch(tmp_path / "pruned", tmp_path / "q", mode)
    loaded = load_classifier(tmp_path / "q")
    assert loaded.config.bertshrink_heads_per_layer == [2, 3]
    assert loaded.bert.encoder.layer[0].intermediate.dense.out_features == 96
    with torch.inference_mode():
        got = loaded(**encoded).logits.float()
    assert_logits_close(mode, got, logits(model, encoded))


def test_evaluation_runner_loads_a_quantized_folder(quantized, encoded):
    runner = TorchClassifier(quantized["int8_dynamic"][0])
    assert runner.forward(encoded).shape == (encoded["input_ids"].shape[0], 3)


def test_unknown_or_repeated_quantization_is_a_clear_error(quantized, source, tmp_path):
    with pytest.raises(UnsupportedQuantizationError, match=r"'int4'.*int8_dynamic, int8_weight_only, fp16, bf16"):
        quantize_torch(source, tmp_path / "x", "int4")
    with pytest.raises(QuantizationError, match="is already quantized"):
        quantize_torch(quantized["fp16"][0], tmp_path / "y", "int8_dynamic")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
