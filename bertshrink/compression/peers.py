"""Peer tools' models (Optimum, Olive) as our model folders, and finding them again.

A peer script (benchmarks/peers/, run in the peer's own venv) leaves an ONNX graph and a record of
what it ran. ``write_peer_folder`` turns that into a folder our runners open, the same shape as a
quantized candidate (``model.onnx``, the teacher's tokenizer and config, ``bertshrink.json``), written
through the model-folder API. ``current_peers`` lists the peer folders made from the teacher that is
there now: a peer of an earlier teacher would not be a like-for-like comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from bertshrink.compression.onnx_export import copy_tokenizer_and_config, op_counts
from bertshrink.compression.quantize_onnx import smoke_test, int8_initializer_fraction
from bertshrink.errors import MissingArtifactError
from bertshrink.modelfolder.files import CONFIG_FILE, ONNX_FILE, ORT_BACKEND
from bertshrink.modelfolder.load import load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, meta_path, read_meta, read_meta_or_default, write_folder
from bertshrink.modelfolder.size import content_fingerprint

PEER_KIND = "peer"


def write_peer_folder(onnx_path: Path, teacher_dir: Path, out_dir: Path, peer: dict) -> Path:
    """``out_dir``: the peer's graph, the teacher's tokenizer and config, metadata with ``peer``.

    ``peer`` is the peer script's record (tool, versions, recipe, ``mode``, seconds); the teacher's
    fingerprint is added so a later run can tell the folder belongs to another teacher.
    """
    onnx_path, teacher_dir = Path(onnx_path), Path(teacher_dir)
    if not onnx_path.is_file():
        raise MissingArtifactError(f"The peer left no ONNX graph at {onnx_path}; see its log.")
    teacher = read_meta_or_default(teacher_dir)

    def fill(tmp: Path) -> ModelMeta:
        target = tmp / ONNX_FILE
        shutil.copyfile(onnx_path, target)
        smoke_test(target)
        copy_tokenizer_and_config(tmp, teacher_dir, load_tokenizer(teacher_dir))
        quantization = {"backend": ORT_BACKEND, "mode": peer.get("mode", "dynamic"), "made_by": peer.get("tool"),
                        "bytes_after": target.stat().st_size,
                        "int8_weight_fraction": round(int8_initializer_fraction(target), 4),
                        "op_counts": op_counts(onnx.load(str(target), load_external_data=False))}
        return ModelMeta(kind=PEER_KIND, format="onnx", label_names=teacher.label_names, max_length=teacher.max_length,
                         data_content_hash=teacher.data_content_hash, teacher_dir=str(teacher_dir),
                         quantization=quantization,
                         peer={**peer, "teacher_fingerprint": content_fingerprint(teacher_dir)})

    return write_folder(Path(out_dir), fill)


def peer_folders(root: Path) -> list[Path]:
    """Folders under ``root`` whose metadata says they are peers, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and (d / CONFIG_FILE).is_file() and meta_path(d).is_file() and read_meta(d).kind == PEER_KIND]


def current_peers(root: Path, teacher_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """(peer folders made from ``teacher_dir`` as it is now, {name: why skipped} for the others)."""
    folders = peer_folders(root)
    if not folders:
        return [], {}
    teacher = content_fingerprint(teacher_dir)
    current, skipped = [], {}
    for folder in folders:
        if (read_meta(folder).peer or {}).get("teacher_fingerprint") == teacher:
            current.append(folder)
        else:
            skipped[folder.name] = f"made from another teacher than {teacher_dir}: run benchmarks/peers.py again"
    return current, skipped
