"""Export a model folder to one self-contained ONNX file, fuse it for ONNX Runtime, check parity.

``export_onnx`` turns any of our model folders (plain, head/FFN-pruned, factorised embeddings)
into an ONNX folder: ``model.onnx`` (weights inside, so its size on disk is the real size), the
tokenizer files, ``config.json`` and ``bertshrink.json``. The exported graph is only kept when
ONNX Runtime's logits match PyTorch's on real texts given by the caller.

Sessions come from ``modelfolder.onnx_session.make_session``, so export checks, quantization and
latency measurements all run with the same threading.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np

import onnx
import onnx_ir as ir
import onnxruntime
import torch
from torch.export import Dim

from bertshrink.errors import CompressionError, MissingArtifactError
from bertshrink.modelfolder.files import CONFIG_FILE, ONNX_FILE
from bertshrink.modelfolder.load import load_classifier, load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, read_meta_or_default, write_folder
from bertshrink.modelfolder.onnx_session import make_session, session_feed

log = logging.getLogger(__name__)

# Inputs a BERT-style classifier may take, in the order the exported graph declares them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
PARITY_BATCH_SIZE = 16
OP_COUNTS_TOP = 15


class OnnxExportError(CompressionError):
    """Neither torch ONNX exporter could export the model."""


class OnnxParityError(CompressionError):
    """The exported graph's logits differ from PyTorch's beyond the allowed tolerance."""


# --------------------------------------------------------------------------- graph facts


def op_counts(model_proto, top: int | None = OP_COUNTS_TOP) -> dict[str, int]:
    """Histogram of the main graph's node op types, most common first (``top`` of them)."""
    counts = Counter(node.op_type for node in model_proto.graph.node)
    return dict(counts.most_common(top))


def _unsupported_op(text: str) -> str | None:
    """The operator an exporter error names, if any (``aten::xxx``, ``aten.xxx.default``, ...)."""
    patterns = (
        r"Unsupported FX nodes:\s*(\{[^}]*\}|\[[^\]]*\])",
        r"(aten::[A-Za-z0-9_.]+)",
        r"OpOverload[^\n]*?(aten\.[A-Za-z0-9_.]+)",
        r"(aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+)",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


# --------------------------------------------------------------------------- export


def _model_inputs(model, tokenizer) -> list[str]:
    """The inputs to export: ids and mask, plus token types when tokenizer and model use them."""
    names = ["input_ids", "attention_mask"]
    embeddings = getattr(getattr(model, model.base_model_prefix, model), "embeddings", None)
    uses_types = getattr(embeddings, "token_type_embeddings", None) is not None
    if uses_types and "token_type_ids" in tokenizer.model_input_names:
        names.append("token_type_ids")
    return names


def _logits_module(model, input_names: Sequence[str]):
    """An ``nn.Module`` whose forward takes the input tensors positionally and returns logits."""
    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs).logits

    wrapper = LogitsOnly().eval()
    wrapper.input_names = list(input_names)
    return wrapper


def _example_inputs(tokenizer, texts: Sequence[str], input_names: Sequence[str], max_length: int):
    """Two real texts (batch > 1, length > 1), so no axis gets specialised to a constant."""
    sample = list(texts[:2]) if len(texts) >= 2 else ["an example", "another example text"]
    encoded = tokenizer(sample, truncation=True, max_length=max_length, padding="longest",
                        return_tensors="pt")
    return tuple(encoded[name].to(torch.int64) for name in input_names)


def _export_dynamo(wrapper, example, path: Path, opset: int, max_positions: int) -> None:
    batch = Dim("batch", min=1, max=4096)
    sequence = Dim("sequence", min=1, max=max_positions)
    shapes = {name: {0: batch, 1: sequence} for name in wrapper.input_names}
    with warnings.catch_warnings():
        # Every input shares the batch/sequence dims; the exporter notes that once per input.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares.*")
        torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=wrapper.input_names,
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamic_shapes=shapes,
                          external_data=False, optimize=True, report=False, verbose=False)


def _export_torchscript(wrapper, example, path: Path, opset: int) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in wrapper.input_names}
    axes[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(wrapper, example, str(path), dynamo=False, input_names=wrapper.input_names,
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamic_axes=axes)


def _export_graph(wrapper, example, path: Path, opset: int, max_positions: int,
                  model_dir: Path) -> str:
    """Export with the dynamo exporter, else the TorchScript one; returns which one worked."""
    try:
        _export_dynamo(wrapper, example, path, opset, max_positions)
        return "dynamo"
    except Exception as dynamo_err:  # noqa: BLE001 - any exporter failure means: try the other
        log.warning("dynamo ONNX export of %s failed (%s: %s); trying the TorchScript exporter",
                    model_dir, type(dynamo_err).__name__, str(dynamo_err)[:500])
        path.unlink(missing_ok=True)
        try:
            _export_torchscript(wrapper, example, path, opset)
            return "torchscript"
        except Exception as ts_err:  # noqa: BLE001
            text = f"{dynamo_err}\n{ts_err}"
            op = _unsupported_op(text)
            what = f"operator {op} is not supported by the ONNX exporters" if op else \
                f"both exporters failed ({type(ts_err).__name__}: {str(ts_err)[:300]})"
            raise OnnxExportError(
                f"Cannot export {model_dir} to ONNX: {what}. Evaluate this model with PyTorch "
                f"instead, or remove the module that uses it before exporting (opset {opset})."
            ) from ts_err


def _optimize_for_ort(path: Path) -> tuple[dict[str, int], str | None]:
    """Fuse the graph at ``path`` in place for ONNX Runtime; returns (fusion counts, error).

    onnxscript's rewriter is used because ``onnxruntime.transformers.optimizer`` finds no
    attention fusion on transformers-5 exports. Its last step, packing Q/K/V into one
    ``Attention`` node, is disabled: ORT's quantizers cannot quantize an ``Attention`` carrying
    ``qkv_hidden_sizes`` and leave it fp32 (a MiniLM int8 file is 31 MB instead of 23 MB, and
    slower). ``MultiHeadAttention`` with separate, quantizable Q/K/V MatMuls remains.
    """
    try:
        # Imported here: the fusions are optional, and an unfused graph is still a correct graph.
        from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort

        model = ir.load(str(path))
        with mock.patch.object(_core, "fuse_attention", lambda model, debug=False: 0):
            model, counts = optimize_for_ort(model)
        tmp = path.with_suffix(".fused.onnx")
        ir.save(model, str(tmp))
        tmp.replace(path)
    except Exception as err:  # noqa: BLE001 - an unfused graph is still a correct graph
        log.warning("ORT graph fusions failed on %s (%s: %s); keeping the unfused graph",
                    path, type(err).__name__, err)
        return {}, f"{type(err).__name__}: {err}"
    return {name: int(n) for name, n in counts.items() if n}, None


# --------------------------------------------------------------------------- parity


def _torch_logits(model, encoded) -> np.ndarray:
    with torch.inference_mode():
        inputs = {k: torch.as_tensor(v) for k, v in encoded.items()}
        return model(**inputs).logits.float().numpy()


def parity_logits(model, session, tokenizer, texts: Sequence[str], max_length: int,
                  batch_size: int = PARITY_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(torch logits, ONNX Runtime logits) on ``texts``, batched and padded to the longest."""
    torch_out, ort_out = [], []
    for i in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length,
                            padding="longest", return_tensors="np")
        feed = session_feed(session, encoded)
        torch_out.append(_torch_logits(model, feed))
        ort_out.append(session.run([OUTPUT_NAME], feed)[0])
    return np.concatenate(torch_out), np.concatenate(ort_out)


def parity_report(expected: np.ndarray, actual: np.ndarray, atol: float,
                  min_agreement: float) -> dict[str, float]:
    """Max / mean absolute logit difference and argmax agreement, with the thresholds."""
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "agreement": float(np.mean(expected.argmax(-1) == actual.argmax(-1))),
        "n": int(len(expected)),
        "atol": float(atol),
        "min_agreement": float(min_agreement),
    }


def check_parity(report: dict, what: str) -> None:
    """Raise ``OnnxParityError`` when ``report`` is outside its own thresholds."""
    if report["max_abs_diff"] <= report["atol"] and report["agreement"] >= report["min_agreement"]:
        return
    raise OnnxParityError(
        f"ONNX export of {what} does not match PyTorch on {report['n']} texts: max |logit diff| "
        f"{report['max_abs_diff']:.3g} (allowed {report['atol']:.3g}), argmax agreement "
        f"{report['agreement']:.4f} (required {report['min_agreement']:.4f}). Try optimize=False "
        "(a fusion may be wrong for this model) or the other exporter; raise atol only if the "
        "difference is numerical noise."
    )


# --------------------------------------------------------------------------- folder


def _require_torch_folder(model_dir: Path) -> None:
    if not (model_dir / CONFIG_FILE).is_file():
        raise MissingArtifactError(
            f"Cannot export {model_dir} to ONNX: no {CONFIG_FILE} there. Point model_dir at a "
            "trained model folder (the teacher stage or a compression recipe writes one)."
        )


def copy_tokenizer_and_config(tmp: Path, source_dir: Path, tokenizer) -> None:
    """An ONNX folder keeps the tokenizer and the source's ``config.json`` beside the graph."""
    tokenizer.save_pretrained(tmp)
    shutil.copy2(source_dir / CONFIG_FILE, tmp / CONFIG_FILE)


def export_onnx(model_dir: Path, out_dir: Path, parity_texts: Sequence[str], max_length: int, *,
                opset: int = 18, optimize: bool = True, atol: float = 1e-3,
                min_agreement: float = 0.995) -> dict:
    """Export ``model_dir`` to ``out_dir/model.onnx``, fused for ORT, checked against PyTorch.

    ``parity_texts`` are real texts (e.g. validation); the export is refused with
    ``OnnxParityError`` when ORT's logits differ by more than ``atol`` or the predicted classes
    agree on less than ``min_agreement`` of them. ``out_dir`` is replaced only on success.
    Returns the report also stored under ``onnx`` in ``out_dir``'s metadata.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _require_torch_folder(model_dir)
    if not parity_texts:
        raise ValueError("export_onnx needs parity_texts (e.g. validation texts) to check the export.")
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir).to("cpu").eval()
    input_names = _model_inputs(model, tokenizer)
    wrapper = _logits_module(model, input_names)
    max_positions = int(getattr(model.config, "max_position_embeddings", 512))
    example = _example_inputs(tokenizer, parity_texts, input_names, min(max_length, max_positions))
    report: dict = {}

    def fill(tmp: Path) -> ModelMeta:
        path = tmp / ONNX_FILE
        with torch.no_grad():
            exporter = _export_graph(wrapper, example, path, opset, max_positions, model_dir)
        fusions, fusions_error = _optimize_for_ort(path) if optimize else ({}, None)
        session = make_session(path, threads=torch.get_num_threads())
        expected, actual = parity_logits(model, session, tokenizer, list(parity_texts), max_length)
        del session
        parity = parity_report(expected, actual, atol, min_agreement)
        check_parity(parity, str(model_dir))
        report.update({
            "exporter": exporter,
            "opset": opset,
            "inputs": input_names,
            "optimized": bool(optimize and fusions_error is None),
            "fusions": fusions,
            "op_counts": op_counts(onnx.load(str(path), load_external_data=False)),
            "parity": parity,
            "onnx_bytes": path.stat().st_size,
            "max_length": int(max_length),
            "source_dir": str(model_dir),
            "export_seconds": round(time.perf_counter() - start, 2),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        })
        if fusions_error:
            report["fusions_error"] = fusions_error
        copy_tokenizer_and_config(tmp, model_dir, tokenizer)
        return read_meta_or_default(model_dir).updated(format="onnx", onnx=report)

    write_folder(out_dir, fill)
    return report
