"""Model folders: load a classifier from any model source, save one atomically with metadata.

A model is a folder (``save_pretrained`` files + tokenizer) plus ``bertshrink.json``, which says
what it is (kind, source, label names, data hash, params). The teacher and every compressed
candidate use this same format, so evaluation and registration treat them alike.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bertshrink.data import replace_dir
from bertshrink.errors import MissingArtifactError, ModelSourceError
from bertshrink.sources import load_error_hint, resolve_model_source

MODEL_META_FILE = "bertshrink.json"


def load_tokenizer_and_classifier(spec: str, label_names: list[str], max_length: int):
    """Tokenizer and a sequence classifier with ``len(label_names)`` outputs from ``spec``.

    A fresh classification head is initialised when the source is a plain encoder (as the
    packaged all-MiniLM-L6-v2 is); that is expected, so transformers' load report is quieted.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    location = resolve_model_source(spec)
    if _is_restructured_folder(location):
        return _load_restructured(location, label_names, max_length)
    id2label = dict(enumerate(label_names))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForSequenceClassification.from_pretrained(
            location,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={name: i for i, name in id2label.items()},
            ignore_mismatched_sizes=True,  # a head fine-tuned for another label set is replaced
        )
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{load_error_hint(spec)}\nCause: {type(err).__name__}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Downstream users (evaluation, MLflow pipelines) truncate at the length we trained with.
    tokenizer.model_max_length = max_length
    return tokenizer, model


def count_parameters(model) -> int:
    """Number of parameter values (tied weights are counted once, as torch lists them once)."""
    return sum(p.numel() for p in model.parameters())


def _is_restructured_folder(location: str) -> bool:
    """A local folder whose config records pruned heads, FFN widths or factorised embeddings."""
    from bertshrink.structure import is_restructured

    config = Path(location) / "config.json"
    return config.is_file() and is_restructured(json.loads(config.read_text()))


def _load_restructured(location: str, label_names: list[str], max_length: int):
    """A restructured model keeps its head: the label set must be the one it was trained for."""
    from transformers import AutoTokenizer

    from bertshrink.structure import load_classifier

    model = load_classifier(location)
    if model.config.num_labels != len(label_names):
        raise ModelSourceError(
            f"{location} is a pruned classifier for {model.config.num_labels} labels; the data has "
            f"{len(label_names)}. Start from an unpruned model for a new label set."
        )
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.model_max_length = max_length
    return tokenizer, model


def save_model_folder(model, tokenizer, meta: dict[str, Any], target: Path) -> Path:
    """Save weights (safetensors), tokenizer and metadata to a temp folder, then swap it in.

    If anything fails before the swap, the previous model at ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {**meta, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    """``bertshrink.json`` of a model folder, or a clear error naming the stage that makes it."""
    path = Path(model_dir) / MODEL_META_FILE
    if not path.is_file():
        raise MissingArtifactError(
            f"No model at {model_dir} ({MODEL_META_FILE} missing). Run the teacher stage first "
            "(`python -m flows.teacher` or `dvc repro teacher`)."
        )
    return json.loads(path.read_text())


def model_format(model_dir: Path) -> str:
    """``pytorch``, ``onnx``, ``sklearn``, with the quantization mode where there is one (``onnx static``)."""
    path = Path(model_dir) / MODEL_META_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    mode = (meta.get("quantization") or {}).get("mode")
    kind = meta.get("format", "pytorch")
    return f"{kind} {mode}" if mode else kind
