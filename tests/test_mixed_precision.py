"""Per-layer mixed precision (Q-BERT, ``mixed_precision`` step) on a tiny random BERT built in the test.

Known answers: the layers the step says it keeps read fp32 (or int8) weights in the quantized graph
and the others do not; the average bits stay within the budget; a layer given outlier weights is the
most sensitive one and the one kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bertshrink.compression.mixed_precision import (EncoderLayer, Int8Options, LayerMembershipError, average_bits,
                                                    choose_precisions, encoder_layers, folder_layers, mixed_precision,
                                                    prediction_harm)
from bertshrink.compression.onnx_export import export_onnx
from bertshrink.compression.recipe import run_recipe
from bertshrink.config.params import parse_params
from bertshrink.config.recipes import CompressParams, check_against_teacher
from bertshrink.errors import ParamsError
from bertshrink.modelfolder.families import family_of
from bertshrink.modelfolder.files import ONNX_FILE
from bertshrink.modelfolder.meta import ModelMeta, read_meta, save_model_folder
from bertshrink.modelfolder.runners import OnnxClassifier, open_model
from conftest import tiny_bert_model, toy_tokenizer

MAX_LENGTH = 32
LAYERS = 4
OUTLIER_LAYER = 2
DEAD_UNIT = 5
# q, k, v, attention output (64 x 64) and FFN in/out (64 x 128) per layer.
WEIGHTS_PER_LAYER = 4 * 64 * 64 + 2 * 64 * 128
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulNBits")


def teacher_model():
    """4 layers, hidden 64, weights of std 0.3 (logits of order 1). In layer 2 one FFN unit is dead (zero
    input weights, bias -100: GELU gives exactly 0) and its output weights are 40: no effect in fp32, but
    every output channel's int8 scale grows ~30x, so quantizing that layer rounds its other weights away."""
    model = tiny_bert_model(3, hidden=64, heads=4, intermediate=128, layers=LAYERS)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.3)
        layer = model.bert.encoder.layer[OUTLIER_LAYER]
        layer.intermediate.dense.weight[DEAD_UNIT] = 0.0
        layer.intermediate.dense.bias[DEAD_UNIT] = -100.0
        layer.output.dense.weight[:, DEAD_UNIT] = 40.0
    return model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, prepared):
    meta = ModelMeta(kind="teacher", label_names=prepared.label_names, max_length=MAX_LENGTH)
    return save_model_folder(teacher_model(), toy_tokenizer(), meta, tmp_path_factory.mktemp("mp") / "teacher")


@pytest.fixture(scope="module")
def exported(teacher, prepared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mp") / "onnx"
    export_onnx(teacher, folder, prepared.splits["validation"]["text"].tolist(), MAX_LENGTH)
    return folder


def recipe(steps):
    return parse_params({"compress": {"recipes": {"r": steps}}}).compress.recipes["r"]


def rows(prepared, n: int = 32):
    frame = prepared.splits["train"].iloc[:n]
    return frame["text"].tolist(), frame["label"].to_numpy()


def run_step(exported, out, prepared, **knobs):
    texts, labels = rows(prepared)
    defaults = dict(low="int8", bits=32.0, method="kl", texts=texts, labels=labels,
                    rows_provenance={"split": "train"}, options=Int8Options(max_length=MAX_LENGTH))
    return mixed_precision(exported, out, **{**defaults, **knobs})


# --------------------------------------------------------------------------- graph inspection


def weight_reads(folder: Path) -> dict[str, tuple[str, int]]:
    """Original weight initializer -> (op type of the node reading it, stored data type) in ``folder``'s graph."""
    graph = onnx.load(str(folder / ONNX_FILE)).graph
    types = {t.name: t.data_type for t in graph.initializer}
    reads = {}
    for node in graph.node:
        for name in node.input:
            if name in types:
                # The quantizers store W as W_quantized (int8) or W_Q4 (packed 4-bit) beside its scales.
                original = name.removesuffix("_quantized").removesuffix("_Q4")
                if original != name or node.op_type == "MatMul":
                    reads.setdefault(original, (node.op_type, types[name]))
    return reads


def layer_weights(exported: Path) -> dict[int, list[str]]:
    """Layer -> the initializer names its MatMuls read, in the exported (fp32) graph."""
    graph = onnx.load(str(exported / ONNX_FILE)).graph
    by_name = {node.name: node for node in graph.node}
    initializers = {t.name for t in graph.initializer}
    return {layer.index: [i for n in layer.nodes for i in by_name[n].input if i in initializers]
            for layer in folder_layers(exported)}


def precision_in_graph(folder: Path, exported: Path) -> list[str]:
    """Each layer's precision as the quantized graph stores its weights: fp32, int8 or int4."""
    reads = weight_reads(folder)
    found = []
    for layer, weights in sorted(layer_weights(exported).items()):
        kinds = {reads[w] for w in weights}
        assert len(kinds) == 1, (layer, kinds)
        op, dtype = kinds.pop()
        found.append({("MatMul", onnx.TensorProto.FLOAT): "fp32", ("MatMulInteger", onnx.TensorProto.INT8): "int8",
                      ("MatMulNBits", onnx.TensorProto.UINT8): "int4"}[(op, dtype)])
    return found


def quantized_inputs(folder: Path, node_names) -> list[str]:
    """Inputs of the named MatMuls that a quantize/dequantize node produces (none for an fp32 layer)."""
    graph = onnx.load(str(folder / ONNX_FILE)).graph
    producer = {out: node for node in graph.node for out in node.output}
    nodes = [node for node in graph.node if node.name in set(node_names)]
    assert len(nodes) == len(node_names) and all(node.op_type == "MatMul" for node in nodes)
    return [i for node in nodes for i in node.input if i in producer and producer[i].op_type in QUANTIZED_OPS]


# --------------------------------------------------------------------------- layer membership


def test_layers_come_from_the_exporters_module_scopes(exported):
    layers = folder_layers(exported)
    assert [layer.index for layer in layers] == list(range(LAYERS))
    assert all(len(layer.nodes) == 6 and layer.weights == WEIGHTS_PER_LAYER for layer in layers)


def test_torchscript_style_names_also_give_layers_and_no_clue_is_refused(exported):
    model = onnx.load(str(exported / ONNX_FILE))
    scoped = {layer.index: set(layer.nodes) for layer in folder_layers(exported)}
    for node in model.graph.node:
        layer = next((i for i, names in scoped.items() if node.name in names), None)
        del node.metadata_props[:]
        node.name = f"/bert/encoder/layer.{layer}/dense/MatMul" if layer is not None else f"/other/{node.name}"
    # Names are not unique now, but membership is all that is asked.
    assert [len(layer.nodes) for layer in encoder_layers(model, family_of("bert"))] == [6] * LAYERS
    for node in model.graph.node:
        node.name = "n"
    with pytest.raises(LayerMembershipError, match="No weight MatMul .* belongs to an encoder layer"):
        encoder_layers(model, family_of("bert"))


# --------------------------------------------------------------------------- chooser and budget


def equal_layers(n: int = 4, weights: int = 100) -> list[EncoderLayer]:
    return [EncoderLayer(i, (f"n{i}",), weights) for i in range(n)]


def test_chooser_keeps_the_most_sensitive_layers_within_the_budget():
    layers = equal_layers()
    sensitivity = {0: 0.1, 1: 0.5, 2: 0.05, 3: 0.3}
    # One fp32 layer of four: 8 + 24/4 = 14 bits; two: 20.
    assert choose_precisions(sensitivity, layers, "int8", 14.0) == {0: "int8", 1: "fp32", 2: "int8", 3: "int8"}
    assert choose_precisions(sensitivity, layers, "int8", 19.9) == {0: "int8", 1: "fp32", 2: "int8", 3: "int8"}
    assert choose_precisions(sensitivity, layers, "int8", 20.0) == {0: "int8", 1: "fp32", 2: "int8", 3: "fp32"}
    assert set(choose_precisions(sensitivity, layers, "int8", 32.0).values()) == {"fp32"}
    assert set(choose_precisions(sensitivity, layers, "int8", 8.0).values()) == {"int8"}
    # int4 with int8 kept layers: 4 + 4/4 = 5 bits per kept layer.
    assert choose_precisions(sensitivity, layers, "int4", 6.0) == {0: "int4", 1: "int8", 2: "int4", 3: "int8"}
    for bits in np.linspace(8, 32, 25):
        assert average_bits(choose_precisions(sensitivity, layers, "int8", bits), layers) <= bits + 1e-9


def test_chooser_skips_a_layer_too_big_for_what_is_left():
    layers = [EncoderLayer(0, ("a",), 300), EncoderLayer(1, ("b",), 100), EncoderLayer(2, ("c",), 100)]
    # Budget 12.8 bits over 500 weights: 2400 spare bits; layer 0 would cost 7200, layer 1 costs 2400.
    chosen = choose_precisions({0: 0.9, 1: 0.5, 2: 0.1}, layers, "int8", 12.8)
    assert chosen == {0: "int8", 1: "fp32", 2: "int8"}
    assert average_bits(chosen, layers) == pytest.approx(12.8)


def test_prediction_harm_known_values():
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    flipped = reference[:, ::-1]
    labels = np.array([0, 1, 1, 1])
    assert prediction_harm(reference, reference, labels, "kl") == pytest.approx(0.0, abs=1e-9)
    assert prediction_harm(reference, flipped, labels, "agreement") == 1.0
    assert prediction_harm(reference, flipped, labels, "accuracy") == pytest.approx(0.75 - 0.25)

    def kl(margin):  # KL(softmax([m, 0]) || softmax([0, m]))
        p = np.array([np.exp(margin), 1.0]) / (np.exp(margin) + 1.0)
        return float(np.sum(p * np.log(p / p[::-1])))

    assert prediction_harm(reference, flipped, labels, "kl") == pytest.approx((2 * kl(2.0) + 2 * kl(1.0)) / 4)


# --------------------------------------------------------------------------- the quantized graph


def test_kept_layers_read_fp32_weights_and_the_others_int8(exported, prepared, tmp_path):
    report = run_step(exported, tmp_path / "mp", prepared, keep_layers=[1, 3])
    assert report["kept_layers"] == [1, 3] and report["precisions"] == ["int8", "fp32", "int8", "fp32"]
    assert precision_in_graph(tmp_path / "mp", exported) == ["int8", "fp32", "int8", "fp32"]
    layers = folder_layers(exported)
    assert quantized_inputs(tmp_path / "mp", layers[1].nodes + layers[3].nodes) == []
    assert report["average_bits"] == pytest.approx((8 + 32 + 8 + 32) / 4)
    meta = read_meta(tmp_path / "mp")
    assert meta.quantization["mode"] == "mixed_precision"
    assert meta.quantization["mixed_precision"]["kept_layers"] == [1, 3]


def test_static_int8_keeps_the_kept_layers_free_of_quantize_nodes(exported, prepared, tmp_path):
    texts, _ = rows(prepared)
    options = Int8Options(mode="static", calibration_texts=tuple(texts), max_length=MAX_LENGTH)
    run_step(exported, tmp_path / "static", prepared, keep_layers=[0], options=options)
    layers = folder_layers(exported)
    assert quantized_inputs(tmp_path / "static", layers[0].nodes) == []
    graph = onnx.load(str(tmp_path / "static" / ONNX_FILE)).graph
    by_name = {node.name: node for node in graph.node}
    # Static QDQ: a quantized layer's MatMuls keep their op type but read dequantized inputs.
    assert all(by_name[n].op_type == "MatMul" for n in layers[1].nodes)
    producer = {out: node.op_type for node in graph.node for out in node.output}
    assert all(producer.get(i) == "DequantizeLinear" for n in layers[1].nodes for i in by_name[n].input)


def test_int4_with_int8_kept_layers(exported, prepared, tmp_path):
    report = run_step(exported, tmp_path / "int4", prepared, low="int4", keep_layers=[2])
    assert report["precisions"] == ["int4", "int4", "int8", "int4"]
    assert precision_in_graph(tmp_path / "int4", exported) == ["int4", "int4", "int8", "int4"]
    assert report["average_bits"] == pytest.approx(5.0)


def test_budget_32_keeps_every_layer_fp32_and_the_minimum_quantizes_every_layer(exported, prepared, tmp_path):
    everything = run_step(exported, tmp_path / "b32", prepared, bits=32.0)
    assert everything["kept_layers"] == list(range(LAYERS)) and everything["average_bits"] == 32.0
    assert precision_in_graph(tmp_path / "b32", exported) == ["fp32"] * LAYERS
    nothing = run_step(exported, tmp_path / "b8", prepared, bits=8.0)
    assert nothing["kept_layers"] == [] and nothing["average_bits"] == 8.0
    assert precision_in_graph(tmp_path / "b8", exported) == ["int8"] * LAYERS
    lowest = run_step(exported, tmp_path / "b4", prepared, low="int4", bits=4.0)
    assert precision_in_graph(tmp_path / "b4", exported) == ["int4"] * LAYERS and lowest["average_bits"] == 4.0


# --------------------------------------------------------------------------- the recipe step


@pytest.mark.slow  # a second export and a sensitivity pass: ~17 s
def test_recipe_step_keeps_the_layer_with_outliers_and_reloads(teacher, exported, prepared, tmp_path):
    steps = recipe(["export_onnx", {"mixed_precision": {"bits": 14, "rows": 32}}])
    records = run_recipe("mixed", steps, teacher, prepared, tmp_path / "candidate", tmp_path / "work", 0, MAX_LENGTH)
    report = records[-1].details["mixed_precision"]
    sensitivity = report["sensitivity"]
    assert len(sensitivity) == LAYERS and int(np.argmax(sensitivity)) == OUTLIER_LAYER
    # Budget 14 bits: one fp32 layer of four (8 + 24/4 = 14), the most sensitive one.
    assert report["kept_layers"] == [OUTLIER_LAYER] and report["average_bits"] == 14.0 <= report["bits_budget"]
    assert report["sensitivity_rows"]["split"] == "train" and report["sensitivity_rows"]["rows"] == 32
    assert report["sensitivity_rows"]["seed"] == 0 and len(report["sensitivity_rows"]["row_ids"]) == 32
    # The export is deterministic: the fixture's export names the same nodes and weights.
    expected = ["fp32" if i == OUTLIER_LAYER else "int8" for i in range(LAYERS)]
    assert report["precisions"] == precision_in_graph(tmp_path / "candidate", exported) == expected
    meta = read_meta(tmp_path / "candidate")
    assert meta.quantization["mixed_precision"]["kept_layers"] == [OUTLIER_LAYER]
    assert meta.recipe_steps[-1]["details"]["mixed_precision"]["sensitivity"] == sensitivity
    runner = open_model(tmp_path / "candidate", threads=1)
    assert isinstance(runner, OnnxClassifier)
    texts = prepared.splits["test"]["text"].tolist()
    assert runner.predict(texts, 8, MAX_LENGTH).shape == (len(texts),)


# --------------------------------------------------------------------------- params


def test_knobs_are_range_checked_and_keep_layers_checked_against_the_teacher():
    assert recipe(["export_onnx", {"mixed_precision": {"bits": 6}}]).steps[-1].low_precision == "int4"
    assert recipe(["export_onnx", {"mixed_precision": {"bits": 12}}]).steps[-1].high_precision == "fp32"
    refusals = {
        "outside 8..32": [{"mixed_precision": {"bits": 6, "low": "int8"}}],
        "outside 4..8": [{"mixed_precision": {"bits": 12, "low": "int4"}}],
        "not both": [{"mixed_precision": {"bits": 12, "keep_layers": [0]}}],
        "less than or equal to 32": [{"mixed_precision": {"bits": 40}}],
        "'train' or 'validation'": [{"mixed_precision": {"split": "test"}}],
    }
    for message, steps in refusals.items():
        with pytest.raises(ParamsError, match=message):
            recipe(["export_onnx", *steps])
    with pytest.raises(ParamsError, match="put export_onnx before it"):
        recipe([{"mixed_precision": {}}, "export_onnx"])
    with pytest.raises(ParamsError, match="mixed_precision and quantize both quantize"):
        recipe(["export_onnx", "quantize", "mixed_precision"])
    params = CompressParams(recipes={"r": recipe([{"drop_layers": {"n_drop": 2}}, "export_onnx",
                                                  {"mixed_precision": {"keep_layers": [0, 3]}}])})
    problems = check_against_teacher(params, num_layers=4, num_heads=4)
    assert problems == ["compress.recipes.r[2].mixed_precision: keep_layers [3] outside 0..1 (the model has 2 "
                        "layers at this step)"]
    albert = check_against_teacher(CompressParams(recipes={"r": recipe(["export_onnx", "mixed_precision"])}),
                                   num_layers=4, num_heads=4, family=family_of("albert"))
    assert albert and "ALBERT models cannot take this step" in albert[0] and "shared weights" in albert[0]
