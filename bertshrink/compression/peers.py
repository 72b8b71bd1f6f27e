"""Peer tools' models (Optimum, Olive) as our model folders.

A peer script (benchmarks/peers/, run in the peer's own venv) leaves an ONNX graph and a record of
what it ran. ``write_peer_folder`` turns that into a folder our runners open, the same shape as a
quantized candidate (``model.onnx``, the teacher's tokenizer and config, ``bertshrink.json``), written
through the model-folder API. ``bertshrink.modelfolder.peers`` finds them again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from bertshrink.compression.onnx_export import copy_tokenizer_and_config, op_counts
from bertshrink.compression.quantize_onnx import smoke_test, int8_initializer_fraction
from bertshrink.errors import MissingArtifactError
from bertshrink.modelfolder.files import ONNX_FILE, ORT_BACKEND
from bertshrink.modelfolder.load import load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, read_meta_or_default, write_folder
from bertshrink.modelfolder.peers import PEER_KIND
from bertshrink.modelfolder.size import content_fingerprint


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
