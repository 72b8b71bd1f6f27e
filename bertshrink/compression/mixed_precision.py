"""Per-layer mixed precision (Q-BERT) for an exported ONNX folder.

1. ``encoder_layers`` finds which weight MatMuls belong to which encoder layer. The dynamo
   exporter records each node's module path (``pkg.torch.onnx.name_scopes`` metadata, e.g.
   ``model.bert.encoder.layer.3``), which survives the ORT fusions; TorchScript-style node names
   (``/bert/encoder/layer.3/...``) are the fallback. The family table says what the layer
   container is called (``encoder.layer``, ``transformer.layer``, ``layers``).
2. ``layer_sensitivities`` quantizes each layer alone to the low precision (the rest fp32) and
   measures how far its predictions move from the fp32 model's on seeded rows: mean KL of the
   class distributions, lost argmax agreement, or lost accuracy.
3. ``choose_precisions`` keeps the most sensitive layers at the higher precision while the
   average bits per encoder weight stay within the budget; ``quantize_layers`` builds that graph
   with the existing quantizers (int4 ``MatMulNBits`` first, then int8 with the fp32 layers'
   nodes excluded).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bertshrink.compression import quantize_onnx
from bertshrink.config.recipes import HIGHER_PRECISION, PRECISION_BITS, SENSITIVITY_METHODS
from bertshrink.errors import MissingArtifactError, QuantizationError
from bertshrink.modelfolder.families import Family, family_of
from bertshrink.modelfolder.files import CONFIG_FILE, ONNX_FILE
from bertshrink.modelfolder.meta import read_meta_or_default, update_meta, write_folder
from bertshrink.modelfolder.runners import OnnxClassifier

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# Ops whose constant second input is a Linear weight the quantizers act on.
WEIGHT_OP_TYPES = ("MatMul",)
SENSITIVITY_BATCH_SIZE = 16


class LayerMembershipError(QuantizationError):
    """The exported graph does not say which encoder layer its weights belong to."""


@dataclass(frozen=True)
class EncoderLayer:
    """One encoder layer's weight MatMuls (node names) and how many weight values they hold."""

    index: int
    nodes: tuple[str, ...]
    weights: int


# --------------------------------------------------------------------------- layer membership


def _layer_pattern(family: Family) -> re.Pattern:
    """``<container>.<index>`` as a whole path segment, e.g. ``(^|.)encoder.layer.(\\d+)(.|$)``."""
    container = family.layers.partition(".*.")[0]
    return re.compile(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)")


def _node_paths(node) -> list[str]:
    """Dotted module paths a node carries: its name scopes (dynamo), else its name (TorchScript)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                return [str(s) for s in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                break
    return [node.name.replace("/", ".").strip(".")]


def node_layer(node, pattern: re.Pattern) -> int | None:
    """The encoder layer ``node`` belongs to, or None (embeddings, pooler, classifier)."""
    for path in _node_paths(node):
        match = pattern.search(path)
        if match:
            return int(match.group(1))
    return None


def node_name(node, position: int) -> str:
    """The name the quantizers know a node by (``quantize_onnx`` names unnamed nodes this way)."""
    return node.name or f"{node.op_type}_{position}"


def _weight_inputs(node, initializers: Mapping[str, onnx.TensorProto]) -> list[str]:
    return [name for name in node.input if name in initializers and len(initializers[name].dims) == 2]


def encoder_layers(model_proto, family: Family) -> list[EncoderLayer]:
    """The encoder layers of an exported graph, in order, with their weight MatMuls.

    Raises ``LayerMembershipError`` when no weight MatMul can be placed in a layer, or when one
    weight is read by two layers (shared weights have no per-layer precision).
    """
    graph = model_proto.graph
    initializers = {t.name: t for t in graph.initializer}
    pattern = _layer_pattern(family)
    nodes: dict[int, list[str]] = {}
    weights: dict[int, set[str]] = {}
    owner: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        inputs = _weight_inputs(node, initializers) if node.op_type in WEIGHT_OP_TYPES else []
        layer = node_layer(node, pattern) if inputs else None
        if layer is None:
            continue
        for weight in inputs:
            if owner.setdefault(weight, layer) != layer:
                raise LayerMembershipError(
                    f"Weight {weight} is used by encoder layers {owner[weight]} and {layer}: layers that share "
                    "weights cannot get precisions of their own. Use the quantize step instead.")
        nodes.setdefault(layer, []).append(node_name(node, position))
        weights.setdefault(layer, set()).update(inputs)
    if not nodes:
        raise LayerMembershipError(
            f"No weight MatMul of the exported graph belongs to an encoder layer ({family.name} layers are "
            f"'{family.layers}.<i>' in the exporter's module scopes or node names). Re-export with export_onnx "
            "(the dynamo exporter records module scopes), or use the quantize step.")
    return [EncoderLayer(i, tuple(nodes[i]), sum(int(np.prod(initializers[w].dims)) for w in weights[i]))
            for i in sorted(nodes)]


def folder_layers(onnx_dir: Path) -> list[EncoderLayer]:
    """``encoder_layers`` of an ONNX folder, its family read from ``config.json``."""
    config = json.loads((Path(onnx_dir) / CONFIG_FILE).read_text())
    model = onnx.load(str(Path(onnx_dir) / ONNX_FILE), load_external_data=False)
    return encoder_layers(model, family_of(config))


# --------------------------------------------------------------------------- budget


def average_bits(precisions: Mapping[int, str], layers: Sequence[EncoderLayer]) -> float:
    """Bits per encoder weight, averaged over every weight value of every layer."""
    total = sum(layer.weights for layer in layers)
    return sum(PRECISION_BITS[precisions[layer.index]] * layer.weights for layer in layers) / total


def choose_precisions(sensitivity: Mapping[int, float], layers: Sequence[EncoderLayer], low: str,
                      bits: float) -> dict[int, str]:
    """The most sensitive layers at ``low``'s higher precision, the rest at ``low``, average bits <= ``bits``.

    Greedy in order of sensitivity (ties: lower index first); a layer too big for what is left of
    the budget is skipped, and a smaller, less sensitive one may still fit.
    """
    high = HIGHER_PRECISION[low]
    step = PRECISION_BITS[high] - PRECISION_BITS[low]
    total = sum(layer.weights for layer in layers)
    spare = (bits - PRECISION_BITS[low]) * total
    chosen = {layer.index: low for layer in layers}
    for layer in sorted(layers, key=lambda l: (-sensitivity[l.index], l.index)):
        cost = step * layer.weights
        if cost <= spare + 1e-9 * total:
            chosen[layer.index] = high
            spare -= cost
    return chosen


# --------------------------------------------------------------------------- building the graph


@dataclass(frozen=True)
class Int8Options:
    """How int8 layers (and the graph outside the encoder) are quantized."""

    mode: str = "dynamic"  # or static
    per_channel: bool = True
    include_embeddings: bool = True
    block_size: int = 32  # int4 weight blocks
    calibration_texts: tuple[str, ...] = ()
    calibration_method: str = "minmax"
    max_length: int = 128


def quantize_layers(onnx_dir: Path, out_dir: Path, layers: Sequence[EncoderLayer], precisions: Mapping[int, str],
                    options: Int8Options, *, quantize_outside: bool = True) -> dict:
    """Write ``onnx_dir``'s graph with each encoder layer at ``precisions[layer]`` (fp32, int8, int4).

    The graph outside the encoder layers (pooler, classifier, and with ``include_embeddings`` the
    embedding tables) is quantized as the int8 quantize step does when ``quantize_outside``, else
    left fp32. Returns the last quantizer's ``quantization`` entry ({} when nothing was quantized).
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    by = {p: [n for layer in layers if precisions[layer.index] == p for n in layer.nodes] for p in PRECISION_BITS}
    graph = onnx.load(str(onnx_dir / ONNX_FILE), load_external_data=False).graph
    every = [node_name(node, i) for i, node in enumerate(graph.node)]
    in_layers = {n for layer in layers for n in layer.nodes}
    keep_fp32 = by["fp32"] + ([] if quantize_outside else [n for n in every if n not in in_layers])
    # Not ".<name>.*": that is the pattern of a killed write, which writing out_dir cleans up.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f"{out_dir.name}-int4-") as tmp:
        source, entry = onnx_dir, {}
        if by["int4"]:
            source, int4 = Path(tmp) / "int4", set(by["int4"])
            entry = quantize_onnx.quantize_int4_onnx(onnx_dir, source, block_size=options.block_size,
                                                     keep_nodes=[n for n in every if n not in int4])
        if by["int8"] or quantize_outside:
            return _quantize_int8(source, out_dir, keep_fp32, options.include_embeddings and quantize_outside, options)
        _copy_folder(source, out_dir)
        return entry


def _quantize_int8(source: Path, out_dir: Path, keep_fp32: Sequence[str], embeddings: bool,
                   options: Int8Options) -> dict:
    if options.mode == "static":
        return quantize_onnx.quantize_static_onnx(
            source, out_dir, list(options.calibration_texts), options.max_length, method=options.calibration_method,
            per_channel=options.per_channel, keep_fp32_nodes=keep_fp32, include_embeddings=embeddings)
    return quantize_onnx.quantize_dynamic_onnx(source, out_dir, per_channel=options.per_channel,
                                               include_embeddings=embeddings, keep_fp32_nodes=keep_fp32)


def _copy_folder(source: Path, out_dir: Path) -> None:
    """The source folder as is (every layer kept at fp32 and nothing else quantized)."""
    def fill(tmp: Path):
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        return read_meta_or_default(source)

    write_folder(out_dir, fill)


# --------------------------------------------------------------------------- sensitivity


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def prediction_harm(reference: np.ndarray, quantized: np.ndarray, labels: np.ndarray | None, method: str) -> float:
    """How much worse ``quantized`` logits are than the fp32 ``reference`` ones, by ``method``.

    ``kl``: mean KL(fp32 || quantized) of the class distributions; ``agreement``: the share of rows
    whose predicted class changed; ``accuracy``: fp32 accuracy minus quantized accuracy on ``labels``.
    """
    if method == "kl":
        p, q = _softmax(reference), _softmax(quantized)
        return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=-1)))
    if method == "agreement":
        return float(np.mean(reference.argmax(-1) != quantized.argmax(-1)))
    if method == "accuracy":
        return float(np.mean(reference.argmax(-1) == labels) - np.mean(quantized.argmax(-1) == labels))
    raise QuantizationError(f"Unknown sensitivity method {method!r}; use one of {', '.join(SENSITIVITY_METHODS)}.")


def layer_sensitivities(onnx_dir: Path, layers: Sequence[EncoderLayer], low: str, texts: Sequence[str],
                        labels: np.ndarray | None, method: str, options: Int8Options, threads: int = 1,
                        scratch_dir: Path | None = None) -> tuple[list[float], float]:
    """Each layer's harm when it alone is quantized to ``low`` (all else fp32); and seconds per layer.

    The trial graphs are written under ``scratch_dir`` (the system temp folder by default) and removed."""
    def logits(folder: Path) -> np.ndarray:
        return OnnxClassifier(folder, threads).logits(list(texts), SENSITIVITY_BATCH_SIZE, options.max_length)

    onnx_dir = Path(onnx_dir)
    reference = logits(onnx_dir)
    started, harms = time.perf_counter(), []
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="sensitivity-") as tmp:
        for layer in layers:
            trial = Path(tmp) / f"layer-{layer.index}"
            precisions = {other.index: "fp32" for other in layers} | {layer.index: low}
            quantize_layers(onnx_dir, trial, layers, precisions, options, quantize_outside=False)
            harms.append(prediction_harm(reference, logits(trial), labels, method))
            shutil.rmtree(trial)
    return harms, (time.perf_counter() - started) / len(layers)


# --------------------------------------------------------------------------- the step


def mixed_precision(onnx_dir: Path, out_dir: Path, *, low: str, bits: float, method: str, texts: Sequence[str],
                    labels: np.ndarray | None, rows_provenance: dict, options: Int8Options,
                    keep_layers: Sequence[int] | None = None, threads: int = 1) -> dict:
    """Measure each layer's sensitivity (unless ``keep_layers`` is given), choose, build ``out_dir``.

    Returns the report also stored under ``quantization.mixed_precision`` in ``out_dir``'s metadata.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if not (onnx_dir / ONNX_FILE).is_file():
        raise MissingArtifactError(f"No {ONNX_FILE} in {onnx_dir}: mixed_precision quantizes an exported ONNX "
                                   "folder. Put export_onnx before it.")
    layers = folder_layers(onnx_dir)
    high = HIGHER_PRECISION[low]
    report: dict = {"low": low, "high": high, "layers": len(layers), "weights_by_layer": [l.weights for l in layers]}
    if keep_layers is not None:
        missing = sorted(set(keep_layers) - {layer.index for layer in layers})
        if missing:
            raise QuantizationError(f"keep_layers {missing} are not layers of {onnx_dir} (it has layers "
                                    f"0..{len(layers) - 1}); pick among those")
        precisions = {layer.index: high if layer.index in keep_layers else low for layer in layers}
        report.update(choice="keep_layers")
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        harms, per_layer = layer_sensitivities(onnx_dir, layers, low, texts, labels, method, options, threads,
                                               scratch_dir=out_dir.parent)
        precisions = choose_precisions(dict(zip((l.index for l in layers), harms)), layers, low, bits)
        report.update(choice="sensitivity", bits_budget=float(bits), sensitivity=harms,
                      sensitivity_method=method, sensitivity_seconds_per_layer=round(per_layer, 3),
                      sensitivity_rows={k: v for k, v in rows_provenance.items()})
    report.update(precisions=[precisions[layer.index] for layer in layers],
                  kept_layers=[layer.index for layer in layers if precisions[layer.index] == high],
                  average_bits=round(average_bits(precisions, layers), 4))
    entry = quantize_layers(onnx_dir, out_dir, layers, precisions, options)
    update_meta(out_dir, quantization={**entry, "mode": "mixed_precision", "mixed_precision": report})
    return report
