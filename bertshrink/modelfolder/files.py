"""File names of a model folder, the formats it can hold, and atomic folder replacement.

No heavy imports here: the config layer reads the quantization mode names from this module.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

from bertshrink.errors import OutputError

META_FILE = "bertshrink.json"          # our metadata (``meta.ModelMeta``)
CONFIG_FILE = "config.json"            # transformers' config (the floor writes a small one too)
SAFETENSORS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"  # torchao int8 state dicts (tensor subclasses safetensors cannot hold)
ONNX_FILE = "model.onnx"
FLOOR_FILE = "floor.npz"               # the TF-IDF + logistic regression floor: its arrays (no pickles)
FLOOR_SPEC_FILE = "floor.json"         # ... its vocabulary and hyper-parameters
LEGACY_FLOOR_FILE = "model.joblib"     # the floor's old pickle: refused, never loaded
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

log = logging.getLogger(__name__)
ORT_BACKEND = "onnxruntime"


def _backup_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def replace_dir(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new`` so that a crash never leaves a half-written ``target``."""
    backup = _backup_of(target)
    shutil.rmtree(backup, ignore_errors=True)
    if target.exists():
        target.rename(backup)
    new.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def recover_leftovers(target: Path) -> list[str]:
    """Undo what a killed write left next to ``target``; returns what was done, for the log.

    A kill between ``replace_dir``'s two renames leaves the last good folder only as its backup:
    it is put back. Temp folders a killed write left (``.<name>.*``) are removed: one writer per
    target at a time, so none of them belongs to a live write.
    """
    target, done = Path(target), []
    backup = _backup_of(target)
    if backup.is_dir() and not target.exists():
        backup.rename(target)
        done.append(f"restored {target} from {backup.name}, left by an interrupted swap")
    for stale in sorted(target.parent.glob(f".{target.name}.*")) if target.parent.is_dir() else []:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            done.append(f"removed {stale}, left by an interrupted write")
    return done


def new_sibling_dir(target: Path) -> Path:
    """An empty temp folder next to ``target``, so the final rename stays on one filesystem;
    leftovers of an earlier, killed write of ``target`` are cleaned up first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for line in recover_leftovers(target):
        log.warning("%s", line)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should read like any other
    return tmp


@contextmanager
def swapped_in(target: Path) -> Iterator[Path]:
    """A temp sibling of ``target`` to fill; when the block ends normally it replaces ``target`` whole.

    If the block raises, ``target`` is untouched and the temp folder is removed.
    """
    tmp = new_sibling_dir(target)
    try:
        yield tmp
        replace_dir(tmp, Path(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful swap; leftovers after a failure


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor (where it would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_probe(place: Path) -> None:
    """Create and remove a temp file in ``place``: mode bits say nothing for root or a read-only mount."""
    if not place.is_dir():
        raise NotADirectoryError(f"{place} is a file, not a folder")
    handle, name = tempfile.mkstemp(prefix=".bertshrink-write-check.", dir=place)
    os.close(handle)
    os.unlink(name)


def require_writable(folders: Mapping[Path, str]) -> None:
    """Raise ``OutputError`` unless every folder (mapped to the setting that places it) can be written.

    Called before long work, so a run does not fail on its last write after an hour of training.
    """
    for folder, setting in folders.items():
        place = _nearest_existing(folder)
        try:
            _write_probe(place)
        except OSError as err:
            why = str(err) if isinstance(err, NotADirectoryError) else f"{place} is not writable ({err.strerror})"
            raise OutputError(
                f"Cannot write to {folder}: {why}. Make {place} a folder this user can write to (its "
                f"permissions and owner; a disk mounted read-only), or point {setting} in params.yaml at a "
                "writable folder."
            ) from None
