"""File names of a model folder, the formats it can hold, and atomic folder replacement.

No heavy imports here: the config layer reads the quantization mode names from this module.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal, get_args

META_FILE = "bertshrink.json"          # our metadata (``meta.ModelMeta``)
CONFIG_FILE = "config.json"            # transformers' config (the floor writes a small one too)
SAFETENSORS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"  # torchao int8 state dicts (tensor subclasses safetensors cannot hold)
ONNX_FILE = "model.onnx"
FLOOR_FILE = "model.joblib"            # the TF-IDF + logistic regression floor
TORCH_WEIGHT_FILES = frozenset({SAFETENSORS_FILE, TORCH_WEIGHTS_FILE, "model.safetensors.index.json",
                                "pytorch_model.bin.index.json"})

# What a folder holds, as ``ModelMeta.format`` says.
Format = Literal["pytorch", "onnx", "sklearn"]
# torch post-training quantization modes, declared once: the quantize step, the quantizer and the loader use
# these (ONNX Runtime's modes are recipe knobs only: config.recipes).
TorchQuantMode = Literal["int8_dynamic", "int8_weight_only", "fp16", "bf16"]
TORCH_QUANT_MODES: tuple[str, ...] = get_args(TorchQuantMode)
TORCH_INT8_MODES = ("int8_dynamic", "int8_weight_only")
TORCH_BACKEND = "torch"
ORT_BACKEND = "onnxruntime"


def replace_dir(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new`` so that a crash never leaves a half-written ``target``."""
    backup = target.with_name(f".{target.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    if target.exists():
        target.rename(backup)
    new.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def new_sibling_dir(target: Path) -> Path:
    """An empty temp folder next to ``target``, so the final rename stays on one filesystem."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should read like any other
    return tmp
