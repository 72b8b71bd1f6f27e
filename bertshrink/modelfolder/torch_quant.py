"""How a torch-quantized folder's parameters are typed: torchao int8 tensors, or fp16 / bf16 casts.

``prepare_quantized`` is called twice with the same mode: by ``compression.quantize_torch`` to
quantize a model, and by ``load.load_classifier`` on a freshly built model before loading the
stored state dict, so the parameters take the stored types and shapes.

torchao is imported inside functions: importing it prints messages about optional CUDA kernels
and changes global state we do not want at import time.
"""

from __future__ import annotations

import torch
from torch import nn

from bertshrink.errors import QuantizationError
from bertshrink.modelfolder.files import TORCH_INT8_MODES, TORCH_QUANT_MODES
from bertshrink.modelfolder.structure import encoder_linear_modules

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class UnsupportedQuantizationError(QuantizationError):
    """A quantization mode is unknown, or cannot run on this machine / library version."""


def check_mode(mode: str) -> str:
    """``mode`` if it is a torch quantization mode, else an error listing them."""
    if mode not in TORCH_QUANT_MODES:
        raise UnsupportedQuantizationError(
            f"Unknown torch quantization mode {mode!r}; use one of {', '.join(TORCH_QUANT_MODES)}.")
    return mode


def import_torchao(mode: str):
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
    layers whose weights are now stored in the reduced format."""
    check_mode(mode)
    if mode in CAST_DTYPES:
        model.to(CAST_DTYPES[mode])
        return sum(isinstance(m, nn.Linear) for m in model.modules())
    assert mode in TORCH_INT8_MODES
    import_torchao(mode)
    from torchao.quantization import quantize_

    names = set(encoder_linear_modules(model))
    quantize_(model, _torchao_config(mode), filter_fn=lambda module, fqn: fqn in names)
    return len(names)
