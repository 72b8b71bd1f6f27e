"""ONNX export (parity, dynamic axes, pruned and factorized models), ONNX Runtime quantization
(dynamic, static with calibration, int4 weights) and calibration-set selection, on tiny random
BERTs built in the test."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pandas as pd
import pytest
from transformers import AutoTokenizer

from bertshrink.compression import onnx_export, prune
from bertshrink.compression.onnx_export import OnnxExportError, OnnxParityError, export_onnx
from bertshrink.compression.quantize_onnx import (
    DEFAULT_KEEP_FP32_OP_TYPES,
    int8_initializer_fraction,
    quantize_dynamic_onnx,
    quantize_int4_onnx,
    quantize_static_onnx,
)
from bertshrink.data.calibration import CalibrationError, calibration_hash, select_calibration
from bertshrink.errors import MissingArtifactError, QuantizationError
from bertshrink.modelfolder.files import META_FILE, ONNX_FILE
from bertshrink.modelfolder.load import load_classifier
from bertshrink.modelfolder.meta import ModelMeta, save_model_folder
from bertshrink.modelfolder.runners import OnnxClassifier, TorchClassifier, open_model
from conftest import build_tiny_bert, toy_corpus

MAX_LENGTH = 32
# hidden 64 / 4 heads / FFN 128: large enough for ORT's fusions and int8 kernels to apply.
SHAPE = {"hidden": 64, "heads": 4, "intermediate": 128}


def texts(n: int = 40, seed: int = 3) -> list[str]:
    return toy_corpus(max(1, n // 3 + 1), seed=seed)["text"].tolist()[:n]


def torch_logits(folder, batch: list[str]) -> np.ndarray:
    return TorchClassifier(folder).logits(batch, batch_size=len(batch), max_length=MAX_LENGTH)


def onnx_logits(folder, batch: list[str]) -> np.ndarray:
    return OnnxClassifier(folder, threads=1).logits(batch, batch_size=len(batch), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A hidden-64 classifier folder (toy WordPiece tokenizer, bertshrink.json)."""
    return build_tiny_bert(tmp_path_factory.mktemp("onnx") / "fp32", num_labels=3,
                           meta={"kind": "teacher", "label_names": ["a", "b", "c"]}, **SHAPE)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "exported"
    return folder, export_onnx(source, folder, texts(), MAX_LENGTH)


# --------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_matches_torch_on_other_batch_and_sequence_sizes(source, exported):
    folder, report = exported
    assert report["parity"]["max_abs_diff"] <= 1e-3 and report["parity"]["agreement"] == 1.0
    assert report["parity"]["n"] == 40
    # Dynamic axes: batch sizes and lengths the export never saw give the same logits.
    for batch in (texts(1, seed=7), texts(9, seed=8), [" ".join(texts(6, seed=9))]):
        np.testing.assert_allclose(onnx_logits(folder, batch), torch_logits(source, batch), atol=1e-4)


def test_export_folder_is_self_contained_and_records_fusions(exported):
    folder, report = exported
    assert {ONNX_FILE, "config.json", META_FILE, "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.data")) and not list(folder.glob("*.safetensors"))
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["kind"] == "teacher" and meta["format"] == "onnx" and meta["onnx"]["opset"] == 18
    assert report["optimized"] and report["exporter"] == "dynamo"
    # The fused graph holds ORT's contrib ops in place of the decomposed layer norms and GELUs.
    assert report["fusions"], "no ORT fusion was applied"
    ops = report["op_counts"]
    assert "SkipLayerNormalization" in ops or "LayerNormalization" in ops
    assert {"Erf", "Gelu", "BiasGelu", "FastGelu"} & set(ops)


@pytest.mark.slow
def test_unoptimized_export_also_matches(source, tmp_path):
    report = export_onnx(source, tmp_path / "plain", texts(16), MAX_LENGTH, optimize=False)
    assert report["fusions"] == {} and not report["optimized"]
    assert report["parity"]["max_abs_diff"] <= 1e-3


def restructured(tmp_path, source, transform) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = transform(load_classifier(source))
    return save_model_folder(model, tokenizer, ModelMeta(kind="candidate"), tmp_path / "pruned")


@pytest.mark.slow
def test_head_and_ffn_pruned_model_exports_with_parity(source, tmp_path):
    def prune_both(model):
        model, _ = prune.prune_heads(model, {0: [0, 1], 1: [3]})
        return prune.prune_ffn(model, ratio=0.5)[0]

    folder = restructured(tmp_path, source, prune_both)
    report = export_onnx(folder, tmp_path / "onnx", texts(), MAX_LENGTH)
    assert report["parity"]["max_abs_diff"] <= 1e-3
    batch = texts(5, seed=11)
    np.testing.assert_allclose(onnx_logits(tmp_path / "onnx", batch), torch_logits(folder, batch), atol=1e-4)
    # The pruned shapes are in the graph: FFN weights of width 64 (half of 128), not 128.
    graph = onnx.load(str(tmp_path / "onnx" / ONNX_FILE)).graph
    dims = {tuple(t.dims) for t in graph.initializer}
    assert (64, 64) in dims and (64, 128) not in dims and (128, 64) not in dims


@pytest.mark.slow
def test_factorized_embeddings_export_with_parity(source, tmp_path):
    folder = restructured(tmp_path, source, lambda model: prune.factorize_embeddings(model, rank=16)[0])
    report = export_onnx(folder, tmp_path / "onnx", texts(), MAX_LENGTH)
    assert report["parity"]["max_abs_diff"] <= 1e-3
    dims = {tuple(t.dims) for t in onnx.load(str(tmp_path / "onnx" / ONNX_FILE)).graph.initializer}
    assert any(16 in d and 64 not in d for d in dims if len(d) == 2), dims  # the vocab x rank table


@pytest.mark.slow
def test_parity_failure_raises_with_numbers_and_keeps_existing_output(source, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    broken = onnx_export.parity_logits

    def off_by_one(*args, **kwargs):
        expected, actual = broken(*args, **kwargs)
        return expected, actual + 1.0

    with mock.patch.object(onnx_export, "parity_logits", off_by_one):
        with pytest.raises(OnnxParityError, match=r"max \|logit diff\| 1 \(allowed 0.001\)"):
            export_onnx(source, out, texts(8), MAX_LENGTH)
    assert (out / "keep.txt").read_text() == "earlier result"
    assert not list(tmp_path.glob(".onnx.*")), "temp export folder left behind"


def test_parity_report_thresholds():
    expected = np.array([[0.0, 1.0], [1.0, 0.0], [0.4, 0.6]])
    ok = onnx_export.parity_report(expected, expected + 1e-5, atol=1e-3, min_agreement=0.995)
    onnx_export.check_parity(ok, "m")
    flipped = onnx_export.parity_report(expected, expected[:, ::-1], atol=10.0, min_agreement=0.995)
    assert flipped["agreement"] == 0.0
    with pytest.raises(OnnxParityError, match="agreement 0.0000"):
        onnx_export.check_parity(flipped, "m")


def test_failed_export_names_the_unsupported_operator(source, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_op' to ONNX opset version 18 is not supported.")

    with mock.patch.object(onnx_export, "_export_dynamo", fail), \
            mock.patch.object(onnx_export, "_export_torchscript", fail):
        with pytest.raises(OnnxExportError, match="operator aten::fancy_op is not supported"):
            export_onnx(source, tmp_path / "onnx", texts(8), MAX_LENGTH)
    assert not (tmp_path / "onnx").exists()


def test_export_of_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(MissingArtifactError, match="no config.json there"):
        export_onnx(tmp_path / "nothing", tmp_path / "onnx", texts(4), MAX_LENGTH)


# --------------------------------------------------------------------------- dynamic int8


@pytest.fixture(scope="module")
def dynamic(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "dynamic"
    return folder, quantize_dynamic_onnx(exported[0], folder)


def test_dynamic_int8_has_int8_weights_and_a_smaller_file(exported, dynamic):
    folder, report = dynamic
    before, after = (exported[0] / ONNX_FILE).stat().st_size, (folder / ONNX_FILE).stat().st_size
    assert report["bytes_before"] == before and report["bytes_after"] == after
    assert after < 0.45 * before
    assert int8_initializer_fraction(folder / ONNX_FILE) > 0.9
    assert int8_initializer_fraction(exported[0] / ONNX_FILE) == 0.0
    ops = onnx_export.op_counts(onnx.load(str(folder / ONNX_FILE)), top=None)
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0) >= 8
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["quantization"]["mode"] == "dynamic" and meta["quantization"]["weight_type"] == "int8"
    assert meta["onnx"]["parity"]["agreement"] == 1.0  # the export report travels with the folder


def test_dynamic_int8_without_embeddings_keeps_gather_tables_fp32(exported, dynamic, tmp_path):
    report = quantize_dynamic_onnx(exported[0], tmp_path / "q", include_embeddings=False)
    assert "Gather" not in report["quantized_op_types"]
    assert report["bytes_after"] > dynamic[1]["bytes_after"]


def test_dynamic_int8_predicts_close_to_fp32(exported, dynamic):
    batch = texts(30, seed=5)
    want, got = onnx_logits(exported[0], batch), onnx_logits(dynamic[0], batch)
    assert np.abs(want - got).max() < 0.1
    assert np.mean(want.argmax(-1) == got.argmax(-1)) >= 0.8


def test_open_model_picks_onnx_runtime_for_onnx_folders(source, dynamic):
    assert isinstance(open_model(source), TorchClassifier)
    runner = open_model(dynamic[0], threads=1)
    assert isinstance(runner, OnnxClassifier)
    assert runner.num_labels == 3
    # int8 tensors are counted: the quantized graph has as many weights as the torch model
    # minus the small classifier head's bias-free remainder.
    torch_params = open_model(source).num_parameters()
    assert 0.8 * torch_params < runner.num_parameters() <= torch_params


def test_small_inputs_run_on_one_thread_and_large_ones_on_the_budget(exported):
    from bertshrink.modelfolder.onnx_session import SMALL_INPUT_TOKENS

    runner = open_model(exported[0], threads=2)
    threads = {"small": runner.session.small, "large": runner.session.large}
    threads = {k: s.get_session_options().intra_op_num_threads for k, s in threads.items()}
    assert threads == {"small": 1, "large": 2}

    def feed(batch, length):
        ids = np.ones((batch, length), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}

    assert runner.session.session_for(feed(1, SMALL_INPUT_TOKENS)) is runner.session.small
    assert runner.session.session_for(feed(2, SMALL_INPUT_TOKENS)) is runner.session.large
    # both sessions compute the same logits
    batch = texts(4)[:1]
    encoded = runner.tokenizer(batch, return_tensors="np")
    feed1 = {n: encoded[n].astype(np.int64) for n in runner.input_names}
    np.testing.assert_allclose(runner.session.small.run(None, feed1)[0], runner.session.large.run(None, feed1)[0],
                               atol=1e-5)
    assert open_model(exported[0], threads=1).session.small is None  # one thread: one session


def test_quantizing_a_torch_folder_asks_for_export_first(source, tmp_path):
    with pytest.raises(MissingArtifactError, match="Run export_onnx first"):
        quantize_dynamic_onnx(source, tmp_path / "q")


# --------------------------------------------------------------------------- static int8


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_calibrates_with_each_method(exported, tmp_path, method):
    folder = tmp_path / method
    report = quantize_static_onnx(exported[0], folder, texts(48, seed=1), MAX_LENGTH, method=method)
    assert report["method"] == method and report["format"] == "qdq" and report["per_channel"]
    assert report["calibration_batches"] == (3 if method == "minmax" else 48)  # histograms: 1 text a batch
    assert int8_initializer_fraction(folder / ONNX_FILE) > 0.9
    # Per-channel scales and Q/DQ nodes weigh more in a 0.4 MB model than in a real one.
    assert report["bytes_after"] < 0.6 * report["bytes_before"]
    ops = report["op_counts"]
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    batch = texts(30, seed=5)
    want, got = onnx_logits(exported[0], batch), onnx_logits(folder, batch)
    assert np.mean(want.argmax(-1) == got.argmax(-1)) >= 0.8
    assert not list(folder.glob("augmented*")), "calibration leftovers in the model folder"


def test_static_keep_fp32_list_leaves_those_ops_unquantized(exported, tmp_path):
    kept = quantize_static_onnx(exported[0], tmp_path / "kept", texts(32), MAX_LENGTH)
    everything = quantize_static_onnx(exported[0], tmp_path / "all", texts(32), MAX_LENGTH,
                                      keep_fp32_op_types=())
    source_ops = onnx_export.op_counts(onnx.load(str(exported[0] / ONNX_FILE)), top=None)
    expected_kept = sum(n for op, n in source_ops.items() if op in DEFAULT_KEEP_FP32_OP_TYPES)
    assert expected_kept > 0 and kept["excluded_nodes_count"] == expected_kept
    assert "Add" not in kept["quantized_op_types"] and "Add" in everything["quantized_op_types"]
    assert everything["excluded_nodes_count"] == 0
    assert kept["op_counts"]["QuantizeLinear"] < everything["op_counts"]["QuantizeLinear"]


def test_static_qoperator_format_runs(exported, tmp_path):
    report = quantize_static_onnx(exported[0], tmp_path / "qop", texts(32), MAX_LENGTH, quant_format="qoperator")
    assert report["format"] == "qoperator"
    assert OnnxClassifier(tmp_path / "qop", threads=1).predict(texts(4), 4, MAX_LENGTH).shape == (4,)


def test_static_bad_settings_are_refused(exported, tmp_path):
    with pytest.raises(QuantizationError, match="calibration method"):
        quantize_static_onnx(exported[0], tmp_path / "x", texts(32), MAX_LENGTH, method="mse")
    with pytest.raises(QuantizationError, match="needs calibration_texts"):
        quantize_static_onnx(exported[0], tmp_path / "x", [], MAX_LENGTH)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- int4 weights


def test_int4_replaces_matmuls_and_shrinks_the_matmul_weights(exported, tmp_path):
    report = quantize_int4_onnx(exported[0], tmp_path / "int4", block_size=32)
    assert report["bits"] == 4 and report["matmulnbits_nodes"] >= 8
    assert report["bytes_after"] < report["bytes_before"]
    batch = texts(20, seed=5)
    want, got = onnx_logits(exported[0], batch), onnx_logits(tmp_path / "int4", batch)
    assert np.abs(want - got).max() < 0.2
    with pytest.raises(QuantizationError, match="power of two"):
        quantize_int4_onnx(exported[0], tmp_path / "bad", block_size=24)


# --------------------------------------------------------------------------- calibration set


def splits(train_rows: int = 100) -> dict[str, pd.DataFrame]:
    frame = toy_corpus(60, seed=4)
    train = frame.iloc[:train_rows].copy()
    train.index = range(1000, 1000 + len(train))
    return {"train": train, "validation": frame.iloc[150:165], "test": frame.iloc[165:180]}


def test_calibration_is_seeded_from_train_with_provenance():
    data = splits()
    chosen, provenance = select_calibration(data, "train", 40, seed=0)
    again, same = select_calibration(data, "train", 40, seed=0)
    other, different = select_calibration(data, "train", 40, seed=1)
    assert chosen == again and provenance == same and provenance["sha256"] != different["sha256"]
    assert provenance["split"] == "train" and provenance["rows"] == 40 and provenance["seed"] == 0
    assert len(set(provenance["row_ids"])) == 40 and all(1000 <= i < 1100 for i in provenance["row_ids"])
    assert data["train"].loc[provenance["row_ids"], "text"].tolist() == chosen
    assert provenance["sha256"] == calibration_hash(provenance["row_ids"], chosen)
    json.dumps(provenance)  # stored in meta and MLflow


@pytest.mark.parametrize("split", ["validation", "test"])
def test_calibration_refuses_evaluation_splits(split):
    with pytest.raises(CalibrationError, match="evaluation split"):
        select_calibration(splits(), split, 40, seed=0)


def test_calibration_refuses_too_few_rows_and_unknown_splits():
    with pytest.raises(CalibrationError, match="at least 32"):
        select_calibration(splits(), "train", 8, seed=0)
    with pytest.raises(CalibrationError, match="has only 20 rows"):
        select_calibration(splits(20), "train", 64, seed=0)
    with pytest.raises(CalibrationError, match="not in the prepared data"):
        select_calibration(splits(), "unlabelled", 64, seed=0)
    texts_, provenance = select_calibration(splits(50), "train", 256, seed=0)
    assert provenance["rows"] == 50 == len(texts_)  # a small split is used whole


def test_calibration_refuses_texts_that_are_also_evaluated():
    data = splits()
    leaked = data["train"].copy()
    leaked.iloc[:60, leaked.columns.get_loc("text")] = data["test"]["text"].str.upper().tolist() * 4
    with pytest.raises(CalibrationError, match="also appear in evaluation splits"):
        select_calibration({**data, "train": leaked}, "train", 100, seed=0)
