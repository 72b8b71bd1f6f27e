"""Post-training quantization for serving from PyTorch: int8 with torchao, or fp16 / bf16 casts.

Modes:

- ``int8_dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig``: int8 per-channel weights,
  activations quantized per token at run time, int8 x int8 matmul;
- ``int8_weight_only``: torchao ``Int8WeightOnlyConfig``: int8 per-channel weights, dequantized
  in the matmul (smaller file, float compute);
- ``fp16`` / ``bf16``: the whole model cast to half precision. Meant for GPU serving; on most
  CPUs they run slower than fp32, which the evaluation shows.

int8 applies to the encoder's Linear layers (attention and FFN); embeddings, LayerNorms, pooler
and classifier head stay fp32.

How a quantized folder is stored and loaded. transformers' own TorchAo integration cannot rebuild
our restructured shapes (pruned heads / FFN widths, factorised embeddings), so we do it ourselves:

- ``config.json`` gets ``bertshrink_quantization = {"backend": "torch", "mode": ...}``, which
  ``structure.load_classifier`` reads: it builds the model from the config, restores the recorded
  shapes, applies ``prepare_quantized(model, mode)`` (the same ``quantize_`` call, or the cast) and
  then loads the stored state dict into it;
- int8 weights are torchao ``Int8Tensor`` subclasses, which safetensors cannot store, so the state
  dict goes to ``pytorch_model.bin`` with ``torch.save``; it loads with ``torch.load(...,
  weights_only=True)`` because importing torchao registers its tensor classes as safe globals;
- fp16 / bf16 are plain tensors: ``model.safetensors`` in that dtype, loaded without upcasting.

``bertshrink.json`` is the source's metadata plus ``quantization`` (see ``quantize_torch``).
torchao is imported only inside functions: importing it prints harmless messages about optional
CUDA kernels and changes global state we do not want at import time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertshrink.quant_training import QuantizationError, encoder_linear_modules

INT8_MODES = ("int8_dynamic", "int8_weight_only")
CAST_MODES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = (*INT8_MODES, *CAST_MODES)
BACKEND = "torch"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"


class UnsupportedQuantizationError(QuantizationError):
    """A quantization mode is unknown, or cannot run on this machine / library version."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``MODES``, else an error listing them."""
    if mode not in MODES:
        raise UnsupportedQuantizationError(
            f"Unknown torch quantization mode {mode!r}; use one of {', '.join(MODES)}.")
    return mode


# --------------------------------------------------------------------------- applying a mode


def _import_torchao(mode: str):
    try:
        import torchao.quantization  # binds ``torchao``; registers its tensors as safe to load
    except ImportError as err:
        raise UnsupportedQuantizationError(
            f"Quantization mode {mode!r} needs torchao (`pip install torchao`); import failed: {err}. "
            "Use fp16/bf16, or the ONNX int8 export instead.") from None
    return torchao


def _torchao_config(mode: str):
    """The torchao config for an int8 mode. ``set_inductor_config=False``: we run eagerly, and
    True would change torch._inductor's global settings for the whole process."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Int8WeightOnlyConfig(set_inductor_config=False)


def prepare_quantized(model, mode: str) -> int:
    """Quantize (int8) or cast (fp16/bf16) ``model`` in place; returns the number of Linear
    layers whose weights are now stored in the reduced format.

    ``load_classifier`` calls this on a freshly built model before loading a quantized state
    dict, so that the parameters have the stored types and shapes.
    """
    check_mode(mode)
    if mode in CAST_MODES:
        model.to(CAST_MODES[mode])
        return sum(isinstance(m, nn.Linear) for m in model.modules())
    _import_torchao(mode)
    from torchao.quantization import quantize_

    names = set(encoder_linear_modules(model))
    quantize_(model, _torchao_config(mode), filter_fn=lambda module, fqn: fqn in names)
    return len(names)


def _smoke_test(model, mode: str) -> None:
    """One tiny forward pass, so a missing CPU kernel fails here, with a fix, not at serving time."""
    ids = torch.tensor([[0, 1]]) % model.config.vocab_size
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    except (RuntimeError, NotImplementedError, AssertionError, TypeError) as err:
        raise UnsupportedQuantizationError(
            f"Quantization mode {mode!r} does not run on this machine (torch {torch.__version__}): "
            f"{type(err).__name__}: {err}. Pick another mode ({', '.join(m for m in MODES if m != mode)}), "
            "or use the ONNX int8 export.") from None
    if not torch.isfinite(logits.float()).all():
        raise UnsupportedQuantizationError(
            f"Quantization mode {mode!r} gives non-finite logits for this model (values out of "
            "range for the reduced precision). Use bf16 or an int8 mode instead.")


# --------------------------------------------------------------------------- saving


def _library_version(mode: str) -> str:
    if mode in INT8_MODES:
        return f"torchao {_import_torchao(mode).__version__}"
    return f"torch {torch.__version__}"


def _weight_bytes(folder: Path) -> int:
    """Bytes of the weight files, counted the way evaluation counts model size."""
    from bertshrink.measure import size_on_disk

    return int(size_on_disk(folder)["weights_bytes"])


def _save_weights(model, folder: Path, mode: str) -> None:
    """int8 state dicts hold torchao tensor subclasses: torch.save; casts: safetensors."""
    if mode in CAST_MODES:
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / TORCH_WEIGHTS_FILE)


def _read_source_meta(model_dir: Path) -> dict[str, Any]:
    # A plain save_pretrained folder (no bertshrink.json) can be quantized too.
    from bertshrink.modeling import MODEL_META_FILE

    path = model_dir / MODEL_META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_folder(model, tokenizer, meta: dict[str, Any], out_dir: Path, mode: str) -> dict[str, Any]:
    """Weights, tokenizer and ``bertshrink.json`` to a temp folder, then swapped in atomically."""
    from bertshrink.data import replace_dir
    from bertshrink.modeling import MODEL_META_FILE

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _save_weights(model, tmp, mode)
        tokenizer.save_pretrained(tmp)
        report = meta["quantization"]
        report["bytes_after"] = _weight_bytes(tmp)
        report["size_ratio"] = round(report["bytes_after"] / max(report["bytes_before"], 1), 4)
        meta["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# --------------------------------------------------------------------------- entry point


def quantize_torch(model_dir, out_dir, mode: str) -> dict[str, Any]:
    """Quantize the classifier in ``model_dir`` with ``mode`` and save it to ``out_dir``.

    Returns the ``quantization`` report also written to ``out_dir/bertshrink.json``: backend,
    mode, library, bytes_before / bytes_after (weight files, as evaluation counts them),
    size_ratio and quantized_linear_count. Load the result with ``structure.load_classifier``.
    """
    from transformers import AutoTokenizer

    from bertshrink.structure import QUANT_KEY, load_classifier

    check_mode(mode)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if model_dir.resolve() == out_dir.resolve():
        raise QuantizationError(f"Quantizing {model_dir} in place would lose the fp32 model; pick another out_dir.")
    model = load_classifier(model_dir).eval()
    if getattr(model.config, QUANT_KEY, None):
        raise QuantizationError(
            f"{model_dir} is already quantized ({getattr(model.config, QUANT_KEY)}); quantize the "
            "full-precision folder it was made from instead.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = prepare_quantized(model, mode)
    _smoke_test(model, mode)
    setattr(model.config, QUANT_KEY, {"backend": BACKEND, "mode": mode})
    report = {"backend": BACKEND, "mode": mode, "library": _library_version(mode),
              "bytes_before": _weight_bytes(model_dir), "quantized_linear_count": count}
    meta = _write_folder(model, tokenizer, {**_read_source_meta(model_dir), "quantization": report}, out_dir, mode)
    return meta["quantization"]
