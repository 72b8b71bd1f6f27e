"""``bertshrink.json``: one metadata schema for every model folder, and the one way to write a folder.

Every producer (fine-tuning, distillation, each compression step, export, quantization, the floor)
writes through ``write_folder`` and every consumer reads through ``read_meta``, so the teacher, a
candidate and the floor are described by the same fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bertshrink.errors import MissingArtifactError
from bertshrink.modelfolder.files import META_FILE, TORCH_BACKEND, Format, swapped_in

Kind = Literal["teacher", "distilled", "candidate", "floor", "peer", "model"]


class ModelMeta(BaseModel):
    """What a model folder is and where it came from. Unknown keys are refused, so a typo in a
    producer fails at once instead of writing a field no consumer reads."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind = "model"
    format: Format = "pytorch"
    created_at: str | None = None
    label_names: list[str] | None = None
    max_length: int | None = None
    data_content_hash: str | None = None
    seed: int | None = None
    # Training: the source model, the knobs (``params``), the resume fingerprint, the Trainer's summary.
    source_model: str | None = None
    params: dict[str, Any] | None = None
    fingerprint: str | None = None
    train_metrics: dict[str, Any] | None = None
    training_run_id: str | None = None
    # Distillation: where the student came from and which teacher layers it learned from.
    teacher_dir: str | None = None
    student_dir: str | None = None
    teacher_layers: list[int] | None = None
    layer_map: list[int] | None = None
    distill: dict[str, Any] | None = None
    transfer_rows: int | None = None
    augmented_rows: int | None = None   # TinyBERT augmentation: new texts the teacher labelled
    parameters_before: int | None = None
    parameters_after: int | None = None
    # Export and quantization reports; static int8's calibration rows.
    onnx: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    # A compression candidate: its recipe and lineage.
    recipe: str | None = None
    recipe_steps: list[dict[str, Any]] | None = None
    teacher_training_run_id: str | None = None
    teacher_model_version: str | None = None
    compress_run_id: str | None = None
    # What a rerun checks in the registry to skip a recipe already done: the teacher's content and the recipe as written.
    teacher_model_fingerprint: str | None = None
    recipe_fingerprint: str | None = None
    # A member of the search's front: study, trial, proxy and full scores, whether it met the constraints.
    search: dict[str, Any] | None = None
    # The floor: the regularisation search and the TF-IDF vocabulary.
    validation_accuracy_by_c: dict[str, float] | None = None
    chosen_c: float | None = None
    vocabulary_size: int | None = None
    # A peer tool's model (benchmarks/peers.py): the tool and its versions, what it ran, the teacher's
    # fingerprint. Timed and reported beside ours, never registered or promoted.
    peer: dict[str, Any] | None = None

    def updated(self, **values: Any) -> "ModelMeta":
        """A copy with ``values`` set (validated, so an unknown key fails here)."""
        return ModelMeta.model_validate({**self.model_dump(exclude_none=True), **values})

    def lineage(self) -> dict[str, Any]:
        """The fields a folder derived from this one inherits (recipe steps keep the recipe's name)."""
        return self.model_dump(exclude_none=True, include={"recipe", "recipe_steps"})

    @property
    def format_label(self) -> str:
        """``pytorch``, ``onnx``, ``sklearn``, with the quantization mode where there is one (``onnx static``)."""
        mode = (self.quantization or {}).get("mode")
        return f"{self.format} {mode}" if mode else self.format

    @property
    def torch_quantized(self) -> bool:
        return (self.quantization or {}).get("backend") == TORCH_BACKEND


def meta_path(folder: Path) -> Path:
    return Path(folder) / META_FILE


def read_meta(folder: Path) -> ModelMeta:
    """``bertshrink.json`` of a model folder, or a clear error naming the stage that makes it."""
    path = meta_path(folder)
    if not path.is_file():
        raise MissingArtifactError(
            f"No model at {folder} ({META_FILE} missing). Run the teacher stage first "
            "(`python -m flows.teacher` or `dvc repro teacher`)."
        )
    return ModelMeta.model_validate(json.loads(path.read_text()))


def read_meta_or_default(folder: Path) -> ModelMeta:
    """The folder's metadata, or an empty one for a plain ``save_pretrained`` folder."""
    return read_meta(folder) if meta_path(folder).is_file() else ModelMeta()


def _write_meta_file(folder: Path, meta: ModelMeta) -> None:
    text = json.dumps(meta.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True, default=str)
    tmp = meta_path(folder).with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(meta_path(folder))


def write_folder(target: Path, fill: Callable[[Path], ModelMeta]) -> Path:
    """Build a model folder in a temp sibling, then swap it in whole.

    ``fill(tmp)`` writes the weights, config and tokenizer into ``tmp`` and returns the folder's
    metadata, which is stamped with ``created_at`` and written last. If anything fails before the
    swap, the previous folder at ``target`` is untouched and the temp folder is removed.
    """
    with swapped_in(target) as tmp:
        meta = fill(tmp)
        _write_meta_file(tmp, meta.updated(created_at=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return Path(target)


def update_meta(folder: Path, **values: Any) -> ModelMeta:
    """Set ``values`` in an existing folder's metadata (the file is replaced atomically)."""
    meta = read_meta(folder).updated(**values)
    _write_meta_file(Path(folder), meta)
    return meta


def save_model_folder(model, tokenizer, meta: ModelMeta, target: Path) -> Path:
    """A transformers model and its tokenizer (safetensors), written atomically with ``meta``."""
    def fill(tmp: Path) -> ModelMeta:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return meta

    return write_folder(target, fill)
