"""Pruning on tiny random BERTs: each edit shrinks the model and matches a masked original."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bertshrink.compression import prune
from bertshrink.modelfolder.load import load_classifier
from bertshrink.modelfolder.structure import FactorizedEmbedding
from conftest import tiny_bert_model, toy_corpus, toy_tokenizer

VOCAB = 60  # the wider models' vocabulary: ``random_inputs`` draws ids below it


@pytest.fixture(scope="module")
def texts():
    return toy_corpus(8, seed=1)["text"].tolist()


@pytest.fixture
def tiny():
    """The default tiny classifier (toy vocabulary, 2 layers of 2 heads, FFN 37) with 3 labels."""
    return tiny_bert_model(3)


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def encode(tokenizer, texts):
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def batches_of(tokenizer, texts, n=2):
    labels = torch.arange(len(texts)) % 3
    return [{**encode(tokenizer, texts[i::n]), "labels": labels[i::n]} for i in range(n)]


def random_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("strategy,expected", [
    ("top", [4, 5]), ("bottom", [0, 1]), ("alternate", [2, 4]), ("symmetric", [2, 3]),
])
def test_drop_layer_strategies_pick_the_right_layers(strategy, expected):
    assert prune.layers_to_drop(6, strategy, 2) == expected


@pytest.mark.parametrize("strategy", ["top", "bottom", "alternate", "symmetric", [0, 2]])
def test_drop_layers_removes_those_weights_and_round_trips(tmp_path, strategy):
    model = tiny_bert_model(3, vocab_size=VOCAB, layers=4, heads=4)
    original = [layer.attention.self.query.weight.clone() for layer in model.bert.encoder.layer]
    model, report = prune.drop_layers(model, strategy, n_drop=2)
    kept = [i for i in range(4) if i not in report["dropped"]]
    assert report["kept"] == kept and len(kept) == 2
    assert model.config.num_hidden_layers == 2 and report["params_after"] < report["params_before"]
    for layer, old in zip(model.bert.encoder.layer, kept):
        assert torch.equal(layer.attention.self.query.weight, original[old])
    inputs = random_inputs()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(model, inputs), logits(reloaded, inputs), atol=1e-6)


def test_drop_layers_refuses_all_layers_or_unknown_strategy():
    with pytest.raises(ValueError, match="4 of 4"):
        prune.drop_layers(tiny_bert_model(3, vocab_size=VOCAB, layers=4, heads=4), "top", n_drop=4)
    with pytest.raises(ValueError, match="middle_out"):
        prune.drop_layers(tiny_bert_model(3, vocab_size=VOCAB, layers=4, heads=4), "middle_out", n_drop=1)
    with pytest.raises(ValueError, match="at least one must go"):
        prune.drop_layers(tiny_bert_model(3, vocab_size=VOCAB, layers=2, heads=4), layers=[0, 1])


# --------------------------------------------------------------------------- heads


def test_head_importance_shape_and_values(tiny, tokenizer, texts):
    scores = prune.head_importance(tiny, batches_of(tokenizer, texts))
    assert scores.shape == (2, 2)
    assert torch.isfinite(scores).all() and (scores >= 0).all() and scores.sum() > 0


def test_prune_heads_matches_gated_original_and_round_trips(tmp_path):
    model = tiny_bert_model(3, vocab_size=VOCAB, layers=2, heads=4)
    original = copy.deepcopy(model)
    to_prune = {0: [1, 3], 1: [0]}
    inputs = random_inputs()
    gates = [torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])]
    with prune.head_gates(original, gates):
        expected = logits(original, inputs)
    model, report = prune.prune_heads(model, to_prune)
    assert report["heads_per_layer"] == [2, 3] and model.config.bertshrink_heads_per_layer == [2, 3]
    assert report["params_after"] < report["params_before"]
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 16
    assert model.bert.encoder.layer[1].attention.output.dense.in_features == 24
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_classifier(tmp_path)
    assert reloaded.bert.encoder.layer[1].attention.self.num_attention_heads == 3
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_prune_heads_keeps_one_head_per_layer():
    with pytest.raises(ValueError, match="at least one"):
        prune.prune_heads(tiny_bert_model(3, vocab_size=VOCAB, layers=2, heads=4), {0: [0, 1, 2, 3]})


def test_select_heads_ratio_count_and_scope():
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.2, 0.3, 0.8, 0.6]])
    assert prune.select_heads(importance, count=3) == {0: [0], 1: [0, 1]}
    assert prune.select_heads(importance, ratio=0.25) == {0: [0], 1: [0]}
    assert prune.select_heads(importance, count=1, scope="per_layer") == {0: [0], 1: [0]}
    assert prune.select_heads(importance, ratio=0.5, scope="per_layer") == {0: [0, 2], 1: [0, 1]}
    # Globally the weakest layer would lose all heads; its best one stays.
    lopsided = torch.tensor([[0.01, 0.02], [0.5, 0.6]])
    assert prune.select_heads(lopsided, count=2) == {0: [0], 1: [0]}
    for bad, message in ((dict(ratio=1.0), r"Head ratio must be in \[0, 1\), got 1.0"),
                         (dict(count=8), "Cannot prune 8 of 8 heads"),
                         (dict(count=4, scope="per_layer"), "Cannot prune 4 of 4 heads in layer 0"),
                         (dict(), "exactly one of ratio or count"),
                         (dict(count=1, scope="by_layer"), "Unknown scope 'by_layer'")):
        with pytest.raises(ValueError, match=message):
            prune.select_heads(importance, **bad)


def test_importance_driven_head_pruning_end_to_end(tiny, tokenizer, texts):
    scores = prune.head_importance(tiny, batches_of(tokenizer, texts))
    model, report = prune.prune_heads(tiny, prune.select_heads(scores, ratio=0.5))
    assert report["heads_per_layer"] == [1, 1]
    assert torch.isfinite(logits(model, encode(tokenizer, texts[:3]))).all()


# --------------------------------------------------------------------------- feed-forward


@pytest.mark.parametrize("use_batches", [False, True])
def test_prune_ffn_matches_masked_original_and_round_trips(tmp_path, tiny, tokenizer, texts, use_batches):
    original = copy.deepcopy(tiny)
    batches = batches_of(tokenizer, texts) if use_batches else None
    importance = prune.ffn_importance(tiny, batches)
    keep = prune.ffn_keep_indices(importance, 0.5)
    masks = []
    for idx in keep:
        mask = torch.zeros(37)
        mask[idx] = 1.0
        masks.append(mask)
    inputs = encode(tokenizer, texts[:4])
    with prune.ffn_masks(original, masks):
        expected = logits(original, inputs)
    model, report = prune.prune_ffn(tiny, 0.5, importance=importance)
    assert report["intermediate_sizes"] == [18, 18] and model.config.intermediate_size == 18  # round(18.5)
    assert report["params_after"] < report["params_before"]
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_classifier(tmp_path)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_heads_then_ffn_then_layers_round_trip(tmp_path):
    model = tiny_bert_model(3, vocab_size=VOCAB, layers=3, heads=4)
    prune.prune_heads(model, {0: [0], 2: [1, 2]})
    prune.prune_ffn(model, 0.3)
    prune.drop_layers(model, layers=[1])
    assert model.config.bertshrink_heads_per_layer == [3, 2]
    inputs = random_inputs()
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_classifier(tmp_path), inputs), logits(model, inputs))


# --------------------------------------------------------------------------- vocabulary


def test_prune_vocab_keeps_corpus_logits_and_tokens(tmp_path, tiny, tokenizer, texts):
    inputs = encode(tokenizer, texts)
    before = logits(tiny, inputs)
    rows = tiny.get_input_embeddings().weight.shape[0]
    model, new_tok, report = prune.prune_vocab(tiny, tokenizer, texts, keep_tokens=["oscar"],
                                               output_dir=tmp_path)
    assert report["vocab_after"] < report["vocab_before"] == rows
    assert model.get_input_embeddings().weight.shape[0] == report["vocab_after"] == model.config.vocab_size
    new_vocab = new_tok.get_vocab()
    assert "oscar" in new_vocab and all(t in new_vocab for t in tokenizer.all_special_tokens)
    new_inputs = encode(new_tok, texts)
    assert torch.equal(logits(model, new_inputs), before)
    # Same segmentation: the token strings match, only the ids are renumbered.
    assert [new_tok.convert_ids_to_tokens(ids) for ids in new_inputs["input_ids"].tolist()] == \
        [tokenizer.convert_ids_to_tokens(ids) for ids in inputs["input_ids"].tolist()]
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded_tok(texts)["input_ids"] == new_tok(texts)["input_ids"]
    assert reloaded_tok.do_lower_case == tokenizer.do_lower_case
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, new_inputs), before)


def test_prune_vocab_rejects_unknown_keep_token(tiny, tokenizer, texts):
    with pytest.raises(ValueError, match="zebra"):
        prune.prune_vocab(tiny, tokenizer, texts, keep_tokens=["zebra"])


def test_factorize_embeddings_shrinks_and_round_trips(tmp_path, tiny, tokenizer, texts):
    inputs = encode(tokenizer, texts[:4])
    before = logits(tiny, inputs)
    model, report = prune.factorize_embeddings(tiny, rank=8)
    assert report["params_after"] < report["params_before"] and 0 < report["relative_error"] < 1
    assert not torch.allclose(logits(model, inputs), before)  # lossy by design
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_classifier(tmp_path), inputs), logits(model, inputs))
    with pytest.raises(ValueError, match="already"):
        prune.factorize_embeddings(model, rank=4)


def test_prune_vocab_of_factorised_embeddings_keeps_corpus_logits(tmp_path, tiny, tokenizer, texts):
    model, _ = prune.factorize_embeddings(tiny, rank=8)
    inputs = encode(tokenizer, texts)
    before = logits(model, inputs)
    model, new_tok, report = prune.prune_vocab(model, tokenizer, texts, output_dir=tmp_path)
    table = model.get_input_embeddings()
    assert isinstance(table, FactorizedEmbedding) and table.low.weight.shape == (report["vocab_after"], 8)
    assert report["vocab_after"] < report["vocab_before"] and report["params_after"] < report["params_before"]
    new_inputs = encode(new_tok, texts)
    assert torch.equal(logits(model, new_inputs), before)
    assert torch.equal(logits(load_classifier(tmp_path), new_inputs), before)


def test_factorize_embeddings_at_full_rank_is_exact(tiny, tokenizer, texts):
    inputs = encode(tokenizer, texts[:4])
    before = logits(tiny, inputs)
    untouched = copy.deepcopy(tiny)
    _, report = prune.factorize_embeddings(tiny, rank=32)  # rank = hidden: the SVD split is exact
    assert report["relative_error"] < 1e-5
    assert torch.allclose(logits(tiny, inputs), before, atol=1e-5)
    with pytest.raises(ValueError, match="between 1 and 32"):
        prune.factorize_embeddings(untouched, rank=0)


@pytest.mark.slow
def test_factorized_and_head_pruned_models_export_to_onnx(tmp_path, tokenizer, texts):
    """Restructured models stay exportable through the project's export: the parity check passes, the
    graph has dynamic batch/sequence axes and gives the PyTorch logits on other shapes than exported."""
    from bertshrink.compression.onnx_export import export_onnx
    from bertshrink.modelfolder.meta import read_meta
    from bertshrink.modelfolder.runners import OnnxClassifier, open_model

    model = tiny_bert_model(3, layers=2, heads=4)
    prune.prune_heads(model, {0: [1, 3]})
    prune.factorize_embeddings(model, rank=8)
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    report = export_onnx(tmp_path / "pruned", tmp_path / "onnx", parity_texts=texts[:8], max_length=32)
    assert report["parity"]["n"] == 8 and report["parity"]["agreement"] == 1.0
    assert report["parity"]["max_abs_diff"] <= 1e-3
    assert read_meta(tmp_path / "onnx").format == "onnx"
    runner = open_model(tmp_path / "onnx")
    assert isinstance(runner, OnnxClassifier)
    other = texts[8:13]  # 5 texts: another batch size and padded length than the 2 exported with
    encoded = tokenizer(other, padding=True, return_tensors="pt")
    assert encoded["input_ids"].shape[0] == 5
    np.testing.assert_allclose(runner.logits(other, 8, 32), logits(model, dict(encoded)).numpy(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- unstructured


def test_magnitude_prune_hits_target_with_real_zeros():
    model = tiny_bert_model(3, vocab_size=VOCAB, layers=2, heads=4)
    linears = prune.encoder_linears(model)
    model, report = prune.magnitude_prune(model, 0.6)
    assert abs(report["measured_sparsity"] - 0.6) < 0.01
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    assert zeros / total == report["measured_sparsity"]
    names = dict(model.named_parameters())
    assert not any(n.endswith("weight_orig") for n in names)  # mask baked in, no reparametrisation
    assert all(type(m.weight) is torch.nn.Parameter for m in linears)
