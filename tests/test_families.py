"""Every compression step on a tiny random model of every supported family (no downloads).

Each family's architecture table (``bertshrink.modelfolder.families``) must point every step at the
right modules. The checks with known answers: pruned heads and FFN neurons give exactly the logits
of the unpruned model with those heads / neurons gated to zero; vocabulary pruning and ONNX export
keep the logits; every candidate reloads through the runner evaluation uses. A step a family
refuses must fail before any work, naming the step and the family.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bertshrink.compression.prune import ffn_importance, ffn_keep_indices, ffn_masks, head_gates, prune_ffn, prune_heads
from bertshrink.compression.recipe import run_recipe
from bertshrink.config.params import parse_params
from bertshrink.config.recipes import check_against_config, check_against_teacher
from bertshrink.modelfolder.families import FAMILIES, family_of, refusal
from bertshrink.modelfolder.load import load_fine_tuned_classifier
from bertshrink.modelfolder.meta import ModelMeta, read_meta, save_model_folder
from bertshrink.modelfolder.runners import OnnxClassifier, TorchClassifier, open_model
from bertshrink.modelfolder.structure import encoder_layers, ffn_width, head_count
from conftest import FAMILY_MODELS, tiny_family_model

MAX_LENGTH = 32

# One cell of the family x step table: the recipe that exercises the step.
STEP_RECIPES = {
    "drop_layers": [{"drop_layers": {"strategy": "top", "n_drop": 1}}],
    "prune_heads": [{"prune_heads": {"ratio": 0.5, "importance_batches": 1}}],
    "prune_ffn": [{"prune_ffn": {"ratio": 0.5}}],
    "prune_vocab": ["prune_vocab"],
    "factorize_embeddings": [{"factorize_embeddings": {"rank": 8}}],
    "magnitude": [{"magnitude": {"sparsity": 0.5}}],
    "distill": [{"distill": {"student_layers": 1, "epochs": 1, "batch_size": 32, "alpha_hidden": 1.0,
                             "alpha_attention": 1.0, "alpha_embedding": 1.0}}],
    "qat": [{"qat": {"epochs": 1, "batch_size": 32}}],
    "quant_noise": [{"quant_noise": {"epochs": 1, "batch_size": 32}}],
    "export_onnx": [{"export_onnx": {"parity_rows": 16}}],
    "onnx_int8": [{"export_onnx": {"parity_rows": 16}}, {"quantize": {"mode": "dynamic"}}],
    "onnx_int4": [{"export_onnx": {"parity_rows": 16}}, {"quantize": {"mode": "int4", "block_size": 16}}],
    "onnx_mixed": [{"export_onnx": {"parity_rows": 16}}, {"mixed_precision": {"bits": 20, "rows": 16}}],
    "torchao_int8": [{"quantize": {"backend": "torch", "mode": "int8_dynamic"}}],
}
MODEL_TYPES = list(FAMILY_MODELS)


def recipe(steps):
    return parse_params({"compress": {"recipes": {"r": steps}}}).compress.recipes["r"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, prepared):
    """A teacher folder per family, with the data's labels (as the teacher stage writes it)."""
    root = tmp_path_factory.mktemp("family-teachers")
    folders = {}
    for model_type in MODEL_TYPES:
        model, tokenizer = tiny_family_model(model_type, num_labels=len(prepared.label_names))
        model.config.id2label = dict(enumerate(prepared.label_names))
        model.config.label2id = {name: i for i, name in enumerate(prepared.label_names)}
        folders[model_type] = save_model_folder(
            model, tokenizer, ModelMeta(kind="teacher", label_names=prepared.label_names, max_length=MAX_LENGTH),
            root / model_type)
    return folders


def test_every_model_type_has_a_table_and_a_tiny_model():
    assert sorted(t for family in FAMILIES for t in family.model_types) == sorted(MODEL_TYPES)
    assert {family.name for family in FAMILIES} == {"BERT", "RoBERTa", "ELECTRA", "DistilBERT", "ALBERT",
                                                     "DeBERTa-v2/v3", "ModernBERT"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pruned_heads_equal_gated_heads(model_type):
    """Removing heads {layer 0: [1, 3], layer 1: [0]} gives the logits of the full model with those
    heads' gates at zero: the table names the right projections, rows and columns."""
    model, tokenizer = tiny_family_model(model_type)
    encoded = tokenizer(["the goal of the match", "a market price was new"], padding=True, return_tensors="pt")
    family = family_of(model)
    gates = [torch.ones(head_count(family, layer)) for layer in encoder_layers(model)]
    gates[0][[1, 3]] = 0
    if len(gates) > 1:
        gates[1][0] = 0
    with torch.no_grad(), head_gates(model, gates):
        gated = model(**encoded).logits
    prune_heads(model, {0: [1, 3], 1: [0]} if len(gates) > 1 else {0: [1, 3]})
    with torch.no_grad():
        pruned = model(**encoded).logits
    assert [head_count(family, layer) for layer in encoder_layers(model)] == ([2, 3] if len(gates) > 1 else [2])
    torch.testing.assert_close(pruned, gated, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(pruned, tiny_family_model(model_type)[0](**encoded).logits, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pruned_ffn_equals_masked_ffn(model_type):
    """prune_ffn(0.5) by magnitude gives the logits of the full model with the dropped neurons masked."""
    model, tokenizer = tiny_family_model(model_type)
    encoded = tokenizer(["the goal of the match", "a market price was new"], padding=True, return_tensors="pt")
    family = family_of(model)
    widths = [ffn_width(family, layer) for layer in encoder_layers(model)]
    _, report = prune_ffn(model, 0.5, importance=None)
    # Recompute which neurons stayed from a fresh copy, then mask the rest on it.
    full, _ = tiny_family_model(model_type)
    keep = ffn_keep_indices(ffn_importance(full), 0.5)
    masks = [torch.zeros(width) for width in widths]
    for mask, kept in zip(masks, keep):
        mask[kept] = 1
    with torch.no_grad(), ffn_masks(full, masks):
        masked = full(**encoded).logits
    with torch.no_grad():
        pruned = model(**encoded).logits
    assert report["intermediate_sizes"] == [18] * len(widths)  # round(0.5 * 37), half to even
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-4)


def _refused(model_type: str, cell: str) -> str | None:
    family = family_of(model_type)
    return next((why for step in STEP_RECIPES[cell] for why in [refusal(family, _kind(step))] if why), None)


def _kind(step) -> str:
    return step if isinstance(step, str) else next(iter(step))


@pytest.mark.slow
@pytest.mark.parametrize("cell", list(STEP_RECIPES))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_step_runs_or_is_refused(model_type, cell, teachers, prepared, tmp_path, record_property):
    """Each cell of the family x step table: the step runs and its candidate reloads and predicts,
    or the family refuses it before any work, naming step and family. ``benchmarks/families.py``
    builds FAMILIES.md from the ``cell`` property recorded here."""
    teacher = teachers[model_type]
    steps = recipe(STEP_RECIPES[cell])
    why = _refused(model_type, cell)
    if why:
        problems = check_against_config(parse_params({"compress": {"recipes": {"r": STEP_RECIPES[cell]}}}).compress,
                                        TorchClassifier(teacher).model.config.to_dict())
        assert any(family_of(model_type).name in p and why in p for p in problems), problems
        record_property("cell", f"refused: {why}")
        return
    first = run_recipe(cell, steps, teacher, prepared, tmp_path / "candidate", tmp_path / "work", 0, MAX_LENGTH)[0]
    candidate = open_model(tmp_path / "candidate")
    texts = prepared.splits["test"]["text"].tolist()
    predictions = candidate.predict(texts, 8, MAX_LENGTH)
    assert len(predictions) == len(texts) and set(predictions.tolist()) <= {0, 1, 2}
    meta = read_meta(tmp_path / "candidate")
    assert meta.format == ("onnx" if cell.startswith("onnx") or cell == "export_onnx" else "pytorch")
    _check_effect(model_type, cell, first, candidate)
    shared = family_of(model_type).shared_layers
    record_property("cell", f"yes ({SHARED_LAYER_NOTES[cell]})" if shared and cell in SHARED_LAYER_NOTES else "yes")


# What a step means for ALBERT, whose layers are one shared layer applied num_hidden_layers times.
SHARED_LAYER_NOTES = {"drop_layers": "fewer passes of the shared layer: faster, not smaller",
                      "distill": "the student makes fewer passes of the shared layer",
                      "prune_heads": "cut from the shared layer, so from every pass",
                      "prune_ffn": "cut from the shared layer, so from every pass"}


# Linear layers in the tiny models' transformer layers: q, k, v, out, FFN in, FFN out per layer;
# ModernBERT fuses q, k, v; ALBERT's two layers are one shared layer.
ENCODER_LINEARS = {"modernbert": 8, "albert": 6}


def _check_effect(model_type: str, cell: str, first, candidate) -> None:
    """What the step must have done, in known values."""
    if cell in ("prune_heads", "prune_ffn", "factorize_embeddings", "prune_vocab"):
        assert first.parameters_after < first.parameters_before
    if cell in ("drop_layers", "distill"):
        assert candidate.model.config.num_hidden_layers == 1
        # ALBERT drops passes through its shared layer: faster, but no weight goes.
        shrinks = model_type != "albert"
        assert (first.parameters_after < first.parameters_before) == shrinks
    if cell == "magnitude":
        assert 0.49 < first.details["measured_sparsity"] < 0.51
    if cell == "onnx_mixed":  # two equal layers, 20 bits: one fp32 (8 + 24 / 2), the more sensitive one
        mixed = read_meta(candidate.model_dir).quantization["mixed_precision"]
        assert sorted(mixed["precisions"]) == ["fp32", "int8"] and mixed["average_bits"] == 20.0
        assert mixed["kept_layers"] == [int(max(range(2), key=lambda i: mixed["sensitivity"][i]))]
    if cell == "torchao_int8":
        assert first.details["quantized_linear_count"] == ENCODER_LINEARS.get(model_type, 12)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_vocabulary_pruning_keeps_logits_on_kept_texts(model_type, teachers, prepared, tmp_path):
    teacher = teachers[model_type]
    run_recipe("vocab", recipe(["prune_vocab"]), teacher, prepared, tmp_path / "vocab", tmp_path / "work", 0, MAX_LENGTH)
    before, after = TorchClassifier(teacher), TorchClassifier(tmp_path / "vocab")
    texts = prepared.splits["train"]["text"].tolist()
    torch.testing.assert_close(after.logits(texts, 8, MAX_LENGTH), before.logits(texts, 8, MAX_LENGTH))
    rows = lambda runner: runner.model.get_input_embeddings().num_embeddings  # noqa: E731
    assert rows(after) < rows(before)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_onnx_export_keeps_logits(model_type, teachers, prepared, tmp_path):
    teacher = teachers[model_type]
    run_recipe("onnx", recipe(["export_onnx"]), teacher, prepared, tmp_path / "onnx", tmp_path / "work", 0, MAX_LENGTH)
    texts = prepared.splits["test"]["text"].tolist()
    expected = TorchClassifier(teacher).logits(texts, 8, MAX_LENGTH)
    actual = OnnxClassifier(tmp_path / "onnx", threads=1).logits(texts, 8, MAX_LENGTH)
    np.testing.assert_allclose(actual, expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_two_step_recipe_then_export_and_int8(model_type, teachers, prepared, tmp_path):
    """Prune FFN, distill into the pruned student, export, quantize int8: one candidate per family."""
    steps = [{"prune_ffn": {"ratio": 0.5}},
             {"distill": {"epochs": 1, "batch_size": 32, "alpha_hidden": 1.0}},
             {"export_onnx": {"parity_rows": 16}}, {"quantize": {"mode": "dynamic"}}]
    records = run_recipe("r", recipe(steps), teachers[model_type], prepared, tmp_path / "c", tmp_path / "work", 0,
                         MAX_LENGTH)
    assert [r.kind for r in records] == ["prune_ffn", "distill", "export_onnx", "quantize"]
    assert records[0].parameters_after < records[0].parameters_before
    runner = open_model(tmp_path / "c")
    assert isinstance(runner, OnnxClassifier)
    assert read_meta(tmp_path / "c").quantization["mode"] == "dynamic"
    assert len(runner.predict(prepared.splits["test"]["text"].tolist(), 8, MAX_LENGTH)) == len(prepared.splits["test"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_preflight_reads_each_family_shape(model_type):
    """The pre-flight check reads layers and heads from each family's own config keys (DistilBERT's
    n_layers, n_heads) and counts ALBERT's shared layer's heads once."""
    config = tiny_family_model(model_type)[0].config.to_dict()
    compress = parse_params({"compress": {"recipes": {
        "all-layers": [{"drop_layers": {"strategy": "top", "n_drop": 2}}],
        "heads": [{"prune_heads": {"count": 4}}]}}}).compress
    problems = check_against_config(compress, config)
    assert "compress.recipes.all-layers[0].drop_layers: drops 2 of 2 layers; at least one must remain" in problems
    # 4 heads in each of 2 layers: 4 can go; ALBERT has 4 heads in its one shared layer: 3 can go.
    assert any(p.startswith("compress.recipes.heads[0].prune_heads") for p in problems) == (model_type == "albert")


def test_a_refused_step_is_named_with_its_family():
    family = replace(family_of("bert"), name="Toy", refused={"prune_heads": "its heads are tied"})
    compress = parse_params({"compress": {"recipes": {"r": ["prune_ffn", {"prune_heads": {"ratio": 0.5}}]}}}).compress
    assert check_against_teacher(compress, 2, 4, 32, family) == [
        "compress.recipes.r[1].prune_heads: Toy models cannot take this step: its heads are tied"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fine_tuned_classifier_of_each_family_is_taken_with_its_labels_reordered(model_type, tmp_path):
    """``teacher.train: false`` finds each family's head: outputs named c, b, a come back as a, b, c."""
    model, tokenizer = tiny_family_model(model_type)
    model.config.id2label = {0: "c", 1: "b", 2: "a"}
    model.config.label2id = {"c": 0, "b": 1, "a": 2}
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    encoded = tokenizer(["the goal of the match"], return_tensors="pt")
    with torch.no_grad():
        original = model(**encoded).logits
    _, adopted = load_fine_tuned_classifier(str(tmp_path / "clf"), ["a", "b", "c"])
    with torch.no_grad():
        torch.testing.assert_close(adopted(**encoded).logits, original[:, [2, 1, 0]])
