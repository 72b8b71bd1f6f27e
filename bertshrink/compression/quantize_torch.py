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
  ``modelfolder.load.load_classifier`` reads: it builds the model from the config, restores the recorded
  shapes, applies ``prepare_quantized(model, mode)`` (the same ``quantize_`` call, or the cast) and
  then loads the stored state dict into it;
- int8 weights are torchao ``Int8Tensor`` subclasses, which safetensors cannot store, so the state
  dict goes to ``pytorch_model.bin`` with ``torch.save``; it loads with ``torch.load(...,
  weights_only=True)`` because importing torchao registers its tensor classes as safe globals;
- fp16 / bf16 are plain tensors: ``model.safetensors`` in that dtype, loaded without upcasting.

The folder's metadata is the source's plus ``quantization`` (see ``quantize_torch``). The modes
are declared once in ``modelfolder.files``; applying one is ``modelfolder.torch_quant``'s job,
since loading a quantized folder needs the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bertshrink.errors import QuantizationError
from bertshrink.modelfolder.files import TORCH_BACKEND, TORCH_INT8_MODES, TORCH_QUANT_MODES, TORCH_WEIGHTS_FILE
from bertshrink.modelfolder.load import load_classifier, load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, read_meta_or_default, write_folder
from bertshrink.modelfolder.size import size_on_disk
from bertshrink.modelfolder.structure import QUANT_KEY
from bertshrink.modelfolder.torch_quant import (CAST_DTYPES, UnsupportedQuantizationError, check_mode, import_torchao,
                                                prepare_quantized)


# --------------------------------------------------------------------------- checks


def _smoke_test(model, mode: str) -> None:
    """One tiny forward pass, so a missing CPU kernel fails here, with a fix, not at serving time."""
    ids = torch.tensor([[0, 1]]) % model.config.vocab_size
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    except (RuntimeError, NotImplementedError, AssertionError, TypeError) as err:
        raise UnsupportedQuantizationError(
            f"Quantization mode {mode!r} does not run on this machine (torch {torch.__version__}): "
            f"{type(err).__name__}: {err}. Pick another mode ({', '.join(m for m in TORCH_QUANT_MODES if m != mode)}), "
            "or use the ONNX int8 export.") from None
    if not torch.isfinite(logits.float()).all():
        raise UnsupportedQuantizationError(
            f"Quantization mode {mode!r} gives non-finite logits for this model (values out of "
            "range for the reduced precision). Use bf16 or an int8 mode instead.")


# --------------------------------------------------------------------------- saving


def _library_version(mode: str) -> str:
    if mode in TORCH_INT8_MODES:
        return f"torchao {import_torchao(mode).__version__}"
    return f"torch {torch.__version__}"


def _weight_bytes(folder: Path) -> int:
    """Bytes of the weight files, counted the way evaluation counts model size."""
    return int(size_on_disk(folder)["weights_bytes"])


def _save_weights(model, folder: Path, mode: str) -> None:
    """int8 state dicts hold torchao tensor subclasses: torch.save; casts: safetensors."""
    if mode in CAST_DTYPES:
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / TORCH_WEIGHTS_FILE)


# --------------------------------------------------------------------------- entry point


def quantize_torch(model_dir, out_dir, mode: str) -> dict[str, Any]:
    """Quantize the classifier in ``model_dir`` with ``mode`` and save it to ``out_dir``.

    Returns the ``quantization`` report also written to ``out_dir/bertshrink.json``: backend,
    mode, library, bytes_before / bytes_after (weight files, as evaluation counts them),
    size_ratio and quantized_linear_count. Load the result with ``structure.load_classifier``.
    """
    check_mode(mode)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if model_dir.resolve() == out_dir.resolve():
        raise QuantizationError(f"Quantizing {model_dir} in place would lose the fp32 model; pick another out_dir.")
    model = load_classifier(model_dir).eval()
    if getattr(model.config, QUANT_KEY, None):
        raise QuantizationError(
            f"{model_dir} is already quantized ({getattr(model.config, QUANT_KEY)}); quantize the "
            "full-precision folder it was made from instead.")
    tokenizer = load_tokenizer(model_dir)
    count = prepare_quantized(model, mode)
    _smoke_test(model, mode)
    setattr(model.config, QUANT_KEY, {"backend": TORCH_BACKEND, "mode": mode})
    report = {"backend": TORCH_BACKEND, "mode": mode, "library": _library_version(mode),
              "bytes_before": _weight_bytes(model_dir), "quantized_linear_count": count}

    def fill(tmp: Path) -> ModelMeta:
        _save_weights(model, tmp, mode)
        tokenizer.save_pretrained(tmp)
        report["bytes_after"] = _weight_bytes(tmp)
        report["size_ratio"] = round(report["bytes_after"] / max(report["bytes_before"], 1), 4)
        # A plain save_pretrained folder (no metadata) can be quantized too.
        return read_meta_or_default(model_dir).updated(quantization=report)

    write_folder(out_dir, fill)
    return report
