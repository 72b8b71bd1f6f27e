"""Quantize an exported ONNX folder with ONNX Runtime: dynamic int8, static int8, int4 weights.

Every function reads a folder written by ``compression.onnx_export.export_onnx`` and writes a
new folder of the same shape (``model.onnx``, tokenizer, ``config.json``, metadata with a
``quantization`` entry) through ``modelfolder.meta.write_folder``, so a failure never leaves a
half-written output.

- ``quantize_dynamic_onnx``: int8 weights, activations quantized per batch at run time; no data.
- ``quantize_static_onnx``: int8 weights and activations, activation ranges calibrated on texts.
- ``quantize_int4_onnx``: 4-bit block-wise weights (``MatMulNBits``), activations stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from bertshrink.compression.onnx_export import copy_tokenizer_and_config, op_counts
from bertshrink.config.recipes import CALIBRATION_METHODS, QUANT_FORMATS
from bertshrink.errors import MissingArtifactError, QuantizationError
from bertshrink.modelfolder.files import ONNX_FILE, ORT_BACKEND
from bertshrink.modelfolder.load import load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, read_meta, read_meta_or_default, write_folder
from bertshrink.modelfolder.onnx_session import make_session

log = logging.getLogger(__name__)

HISTOGRAM_METHODS = ("entropy", "percentile")  # ORT keeps every activation of every batch
# Ops whose int8 versions are the known causes of accuracy collapse in BERT (optimum issue
# #151): normalisation, GELU and residual adds see outliers that an 8-bit range cannot hold.
DEFAULT_KEEP_FP32_OP_TYPES = (
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "Erf", "Add", "Softmax",
)
# ORT's dynamic quantizer has int8 kernels for MatMul (and Gather, i.e. embedding tables);
# the small classifier Gemm stays fp32.
DYNAMIC_OP_TYPES = ("MatMul",)
EMBEDDING_OP_TYPES = ("Gather",)
# Static quantization considers only these, not ORT's whole registry: Where/Mul/Unsqueeze/...
# carry the additive attention mask (-3.4e38 where padded), which no 8-bit range holds, and
# whose histogram makes entropy calibration fail ("Too many bins for data range").
STATIC_CANDIDATE_OP_TYPES = ("MatMul", "Gemm", "Gather", "Add", "LayerNormalization", "Softmax")


# --------------------------------------------------------------------------- graph helpers


class _DropOrtTypeNoise(logging.Filter):
    """ORT's quantizer logs a multi-line warning per int64 shape tensor it skips, and advice to
    pre-process, which we skip on purpose: its ORT graph optimization would undo or duplicate
    the onnxscript fusions the exported graph already has."""

    NOISE = ("unsupported type to quantize for tensor", "pre-processing before quantization")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in str(record.msg) for noise in self.NOISE)


@contextlib.contextmanager
def _quiet_ort_quantizer():
    # ORT logs through the root logger; the filter is removed again on exit.
    noise = _DropOrtTypeNoise()
    logging.getLogger().addFilter(noise)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(noise)


@contextlib.contextmanager
def _logger_at_warning(name: str):
    """The MatMulNBits quantizer logs a line per node at INFO (and every excluded node): too much for a run log."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _require_onnx_folder(onnx_dir: Path) -> Path:
    path = Path(onnx_dir) / ONNX_FILE
    if not path.is_file():
        raise MissingArtifactError(
            f"No {ONNX_FILE} in {onnx_dir}: quantization works on an exported ONNX folder. "
            "Run export_onnx first (bertshrink.compression.onnx_export.export_onnx)."
        )
    return path


def _weight_initializers(model_proto) -> list:
    """Initializers that are weights: at least 2-D and 64 values (not scales or zero points)."""
    return [t for t in model_proto.graph.initializer
            if len(t.dims) >= 2 and int(np.prod(t.dims)) >= 64]


def int8_initializer_fraction(onnx_path: Path) -> float:
    """Share of the graph's weight bytes stored as int8/uint8 initializers (0 when none)."""

    model = onnx.load(str(onnx_path))
    total = int8 = 0
    for tensor in _weight_initializers(model):
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * int(np.prod(tensor.dims))
        total += size
        if tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            int8 += size
    return int8 / total if total else 0.0


def nodes_of_types(onnx_path: Path, op_types: Iterable[str]) -> list[str]:
    """Names of the main graph's nodes whose op type is in ``op_types``."""
    wanted = set(op_types)
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [node.name for node in model.graph.node if node.op_type in wanted and node.name]


def _unnamed_nodes_named(path: Path) -> None:
    """Give every node a name: exclusion lists are by name, and exporters leave some empty."""
    model = onnx.load(str(path))
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            changed = True
    if changed:
        onnx.save(model, str(path))


def _working_copy(source: Path, tmp: Path, keep_fp32_nodes: Sequence[str],
                  keep_fp32_op_types: Sequence[str]) -> tuple[Path, list[str]]:
    """Copy ``source`` into ``tmp`` with every node named; returns it and the node names kept fp32."""
    work = tmp / "input.onnx"
    shutil.copy2(source, work)
    _unnamed_nodes_named(work)
    return work, sorted(set(keep_fp32_nodes) | set(nodes_of_types(work, keep_fp32_op_types)))


def _kept_fp32_entry(op_types, keep_fp32_op_types, keep_fp32_nodes, excluded) -> dict:
    """What was quantized and what was kept fp32, for the ``quantization`` meta entry."""
    return {"quantized_op_types": list(op_types), "keep_fp32_op_types": list(keep_fp32_op_types),
            "keep_fp32_nodes": list(keep_fp32_nodes), "excluded_nodes_count": len(excluded)}


# --------------------------------------------------------------------------- output folder


def _finished_meta(tmp: Path, onnx_dir: Path, quantization: dict) -> ModelMeta:
    """Copy the tokenizer and config beside the quantized graph; the source's metadata plus ``quantization``."""
    copy_tokenizer_and_config(tmp, onnx_dir, load_tokenizer(onnx_dir))
    return read_meta_or_default(onnx_dir).updated(format="onnx", quantization=quantization)


def _entry(mode: str, source: Path, quantized: Path, started: float, **fields) -> dict:
    """The ``quantization`` metadata entry: backend, mode, the mode's own fields, sizes, seconds."""
    return {"backend": ORT_BACKEND, "mode": mode, **fields, **_sizes(source, quantized),
            "seconds": round(time.perf_counter() - started, 2)}


def _write(out_dir: Path, fill) -> dict:
    """Write the quantized folder through the model-folder API; returns its ``quantization`` entry."""
    write_folder(out_dir, fill)
    return read_meta(out_dir).quantization


def _sizes(source: Path, quantized: Path) -> dict:
    return {
        "bytes_before": source.stat().st_size,
        "bytes_after": quantized.stat().st_size,
        "int8_weight_fraction": round(int8_initializer_fraction(quantized), 4),
        "op_counts": op_counts(onnx.load(str(quantized), load_external_data=False)),
    }


def smoke_test(path: Path) -> None:
    """Build a session once, so a graph ORT cannot run fails here and not at evaluation."""
    try:
        make_session(path, threads=1)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
        raise QuantizationError(
            f"ONNX Runtime cannot load the quantized model {path} ({type(err).__name__}: {err}). "
            "Keep more op types in fp32 (keep_fp32_op_types) or use dynamic quantization."
        ) from err


# --------------------------------------------------------------------------- dynamic int8


def quantize_dynamic_onnx(onnx_dir: Path, out_dir: Path, *, per_channel: bool = False,
                          include_embeddings: bool = True, keep_fp32_nodes: Sequence[str] = (),
                          keep_fp32_op_types: Sequence[str] = ()) -> dict:
    """Int8 (QInt8) weights of MatMuls (and embedding Gathers), activations quantized at run time.

    Needs no calibration data. With ``include_embeddings`` the embedding tables are int8 too,
    so the file really shrinks about 4x. Returns the ``quantization`` meta entry.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    source = _require_onnx_folder(onnx_dir)
    start = time.perf_counter()
    wanted = (*DYNAMIC_OP_TYPES, *(EMBEDDING_OP_TYPES if include_embeddings else ()))
    op_types = [t for t in wanted if t not in set(keep_fp32_op_types)]
    def fill(tmp: Path) -> ModelMeta:
        work, excluded = _working_copy(source, tmp, keep_fp32_nodes, keep_fp32_op_types)
        target = tmp / ONNX_FILE
        try:
            with _quiet_ort_quantizer():
                quantize_dynamic(
                    str(work), str(target), per_channel=per_channel, weight_type=QuantType.QInt8,
                    op_types_to_quantize=op_types, nodes_to_exclude=excluded,
                    # After onnxscript's fusions some weights lack a recorded type; without this ORT
                    # raises "Unable to find data type for weight_name ...".
                    extra_options={"DefaultTensorType": _float_type()},
                )
        except Exception as err:  # noqa: BLE001
            raise QuantizationError(
                f"Dynamic int8 quantization of {source} failed ({type(err).__name__}: {err}). "
                "Re-export with optimize=False or exclude the failing nodes (keep_fp32_nodes)."
            ) from err
        work.unlink()
        smoke_test(target)
        return _finished_meta(tmp, onnx_dir, _entry(
            "dynamic", source, target, start, weight_type="int8", per_channel=bool(per_channel),
            **_kept_fp32_entry(op_types, keep_fp32_op_types, keep_fp32_nodes, excluded)))

    return _write(out_dir, fill)


def _float_type() -> int:
    return onnx.TensorProto.FLOAT


# --------------------------------------------------------------------------- static int8


class TextCalibrationReader:
    """``CalibrationDataReader`` over tokenized texts: one padded batch per ``get_next``.

    Each batch is padded to its own longest text and truncated at ``max_length``; only the
    inputs the model declares are fed, as int64. With ``uniform`` every batch has the same
    shape (one text each, padded to the longest text of all), which ORT's histogram
    calibrators need: they stack the outputs of all batches into one array.
    """

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int, input_names: Sequence[str],
                 batch_size: int = 16, uniform: bool = False):
        padding, pad_to = "longest", None
        if uniform:
            batch_size, padding = 1, "max_length"
            pad_to = max(len(ids) for ids in tokenizer(list(texts), truncation=True,
                                                       max_length=max_length)["input_ids"])
        self.batches = []
        for i in range(0, len(texts), batch_size):
            encoded = tokenizer(list(texts[i:i + batch_size]), truncation=True,
                                max_length=pad_to or max_length, padding=padding, return_tensors="np")
            self.batches.append({n: np.asarray(encoded[n], dtype=np.int64) for n in input_names})
        self._iter = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _calibration_reader(onnx_dir: Path, source: Path, texts: Sequence[str], max_length: int,
                        batch_size: int, uniform: bool):
    tokenizer = load_tokenizer(onnx_dir)
    input_names = [i.name for i in make_session(source, threads=1).get_inputs()]

    class Reader(TextCalibrationReader, CalibrationDataReader):
        pass

    return Reader(tokenizer, texts, max_length, input_names, batch_size, uniform)


def _calibration_method(method: str):
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise QuantizationError(f"Unknown calibration method {method!r}; use one of {CALIBRATION_METHODS}.")
    return methods[method]


def _quant_format(quant_format: str):
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise QuantizationError(f"Unknown quant_format {quant_format!r}; use one of {QUANT_FORMATS}.")
    return formats[quant_format]


def _static_op_types(include_embeddings: bool, keep_fp32_op_types: Sequence[str]) -> list[str]:
    """The candidate op types ORT can quantize statically, minus the ones kept fp32."""
    keep = set(keep_fp32_op_types) | (set() if include_embeddings else set(EMBEDDING_OP_TYPES))
    supported = set(QLinearOpsRegistry) | set(QDQRegistry)
    return sorted(t for t in STATIC_CANDIDATE_OP_TYPES if t in supported and t not in keep)


def quantize_static_onnx(onnx_dir: Path, out_dir: Path, calibration_texts: Sequence[str],
                         max_length: int, *, method: str = "minmax", per_channel: bool = True,
                         quant_format: str = "qdq",
                         keep_fp32_op_types: Sequence[str] = DEFAULT_KEEP_FP32_OP_TYPES,
                         keep_fp32_nodes: Sequence[str] = (), include_embeddings: bool = True,
                         batch_size: int = 16) -> dict:
    """Int8 weights and activations; activation ranges calibrated on ``calibration_texts``.

    ``method``: ``minmax`` (fast, sensitive to outliers), ``entropy`` or ``percentile``
    (histograms of every activation: ORT holds all of them in memory at once, texts x longest
    text x hidden x tensors, so use a few hundred texts at most).
    Activations are asymmetric uint8 and weights symmetric int8 (U8S8): x86 VNNI's
    ``VPDPBUSD`` multiplies u8 by s8, so this pair runs the int8 GEMMs without conversion, and
    ``reduce_range`` is off because VNNI accumulates in int32 without saturating.
    Nodes of ``keep_fp32_op_types`` (LayerNorm, GELU, residual Add, Softmax by default: the
    known causes of accuracy collapse) and ``keep_fp32_nodes`` stay fp32.
    Returns the ``quantization`` meta entry; the caller adds calibration provenance.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    source = _require_onnx_folder(onnx_dir)
    calibrate = _calibration_method(method)
    fmt = _quant_format(quant_format)
    if not calibration_texts:
        raise QuantizationError("Static quantization needs calibration_texts (training texts); "
                                "select them with bertshrink.data.calibration.select_calibration.")
    start = time.perf_counter()
    op_types = _static_op_types(include_embeddings, keep_fp32_op_types)
    def fill(tmp: Path) -> ModelMeta:
        work, excluded = _working_copy(source, tmp, keep_fp32_nodes, keep_fp32_op_types)
        reader = _calibration_reader(onnx_dir, work, list(calibration_texts), max_length, batch_size,
                                     uniform=method in HISTOGRAM_METHODS)
        target = tmp / ONNX_FILE
        try:
            with _quiet_ort_quantizer():
                quantize_static(
                    str(work), str(target), reader, quant_format=fmt, op_types_to_quantize=op_types,
                    per_channel=per_channel, reduce_range=False, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibrate_method=calibrate,
                    extra_options={
                        "DefaultTensorType": _float_type(),  # see quantize_dynamic_onnx
                        "WeightSymmetric": True,
                        "ActivationSymmetric": False,
                        # Only weight MatMuls: products of two activations (unfused attention
                        # scores) lose too much in int8.
                        "MatMulConstBOnly": True,
                        # Percentile default is 99.999; entropy bins default to 128.
                        "CalibPercentile": 99.999,
                    },
                )
        except Exception as err:  # noqa: BLE001
            raise QuantizationError(
                f"Static int8 quantization ({method}, {quant_format}) of {source} failed "
                f"({type(err).__name__}: {err}). Try method='minmax', fewer calibration texts, "
                "or keep the failing op types in fp32 (keep_fp32_op_types)."
            ) from err
        work.unlink()
        _remove_augmented_leftovers(tmp)
        smoke_test(target)
        return _finished_meta(tmp, onnx_dir, _entry(
            "static", source, target, start, method=method, per_channel=bool(per_channel), format=quant_format,
            activation_type="uint8", weight_type="int8", calibration_batches=len(reader),
            **_kept_fp32_entry(op_types, keep_fp32_op_types, keep_fp32_nodes, excluded)))

    return _write(out_dir, fill)


def _remove_augmented_leftovers(folder: Path) -> None:
    # Older ORT versions leave the calibration graph next to the output.
    for name in ("augmented_model.onnx", "input-inferred.onnx"):
        (folder / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- int4 weights


def quantize_int4_onnx(onnx_dir: Path, out_dir: Path, *, block_size: int = 32,
                       keep_nodes: Sequence[str] = ()) -> dict:
    """4-bit block-wise, weight-only quantization of MatMul weights (``MatMulNBits``, CPU).

    Each block of ``block_size`` input rows gets its own scale and zero point; activations
    stay fp32. Embedding tables stay fp32, and so do the nodes named in ``keep_nodes``.
    Returns the ``quantization`` meta entry.
    """
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as err:
        raise QuantizationError(
            f"This onnxruntime has no MatMulNBitsQuantizer ({err}); upgrade onnxruntime to "
            ">= 1.17 for 4-bit weights."
        ) from err
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(f"block_size must be a power of two >= 16 (MatMulNBits), got {block_size}.")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    source = _require_onnx_folder(onnx_dir)
    start = time.perf_counter()
    def fill(tmp: Path) -> ModelMeta:
        target = tmp / ONNX_FILE
        work, excluded = _working_copy(source, tmp, keep_nodes, ())
        try:
            quantizer = MatMulNBitsQuantizer(onnx.load(str(work)), bits=4, block_size=block_size,
                                             is_symmetric=False, op_types_to_quantize=("MatMul",),
                                             nodes_to_exclude=excluded)
            with _logger_at_warning(MatMulNBitsQuantizer.__module__):
                quantizer.process()
            quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
        except Exception as err:  # noqa: BLE001
            raise QuantizationError(
                f"4-bit quantization of {source} failed ({type(err).__name__}: {err}). "
                "Use dynamic int8 quantization instead."
            ) from err
        work.unlink()
        replaced = op_counts(onnx.load(str(target), load_external_data=False), top=None).get("MatMulNBits", 0)
        if not replaced:
            raise QuantizationError(f"4-bit quantization of {source} replaced no MatMul (no constant "
                                    "weights found); re-export the model with export_onnx.")
        smoke_test(target)
        return _finished_meta(tmp, onnx_dir, _entry(
            "weight_only", source, target, start, bits=4, block_size=block_size, symmetric=False,
            matmulnbits_nodes=replaced, keep_fp32_nodes=list(keep_nodes)))

    return _write(out_dir, fill)
