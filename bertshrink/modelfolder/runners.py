"""Open any model folder as a runner: texts in, logits and class ids out.

``open_model`` picks how to run a folder from what it holds (ONNX graph, the floor's pipeline, or
PyTorch weights, restructured or torch-quantized included). A runner exposes ``tokenizer``,
``return_tensors``, ``max_length_limit``, ``num_labels``, ``forward(encoded) -> logits``,
``logits``, ``predict`` and ``num_parameters``. Evaluation, latency measurement and the
compression steps' parameter counts all go through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import torch

from bertshrink.errors import MissingArtifactError, ModelSourceError
from bertshrink.modelfolder.files import CONFIG_FILE, FLOOR_FILE, LEGACY_FLOOR_FILE, ONNX_FILE, TORCH_WEIGHT_FILES
from bertshrink.modelfolder.floor_format import PassThroughTokenizer, floor_parameters, load_floor
from bertshrink.modelfolder.load import load_classifier, load_tokenizer
from bertshrink.modelfolder.onnx_session import SizedSessions
from bertshrink.modelfolder.size import count_parameters


class _TextRunner:
    """Texts -> logits / class ids in batches; subclasses give ``forward``, ``tokenizer``, ``num_labels``."""

    def logits(self, texts: Sequence[str], batch_size: int, max_length: int) -> np.ndarray:
        """Logits for raw texts, tokenized in batches of ``batch_size``."""
        out = [self.forward(encode(self, texts[i:i + batch_size], max_length))
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_labels), dtype=np.float32)

    def predict(self, texts: Sequence[str], batch_size: int, max_length: int) -> np.ndarray:
        """Predicted class ids."""
        return self.logits(texts, batch_size, max_length).argmax(axis=-1)


class TorchClassifier(_TextRunner):
    """Runs a ``save_pretrained`` folder with PyTorch on CPU, in eval and inference mode."""

    return_tensors = "pt"

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        # Pruned heads / FFN widths are not expressible in a standard config; this restores them.
        model = load_classifier(self.model_dir)
        self.model = model.to("cpu").eval()
        self.num_labels = int(self.model.config.num_labels)
        self.max_length_limit = _max_length_limit(self.tokenizer, self.model.config)

    def forward(self, encoded: Mapping[str, Any]) -> np.ndarray:
        """Logits for already-tokenized inputs; this is the part latency measures."""
        with torch.inference_mode():
            return self.model(**encoded).logits.float().numpy()

    def num_parameters(self) -> int:
        return count_parameters(self.model)


class OnnxClassifier(_TextRunner):
    """Runs an exported folder (``model.onnx`` + tokenizer + config) with ONNX Runtime on CPU."""

    return_tensors = "np"

    def __init__(self, model_dir: Path, threads: int):
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        config = json.loads((self.model_dir / CONFIG_FILE).read_text())
        self.session = SizedSessions(self.model_dir / ONNX_FILE, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
        positions = SimpleNamespace(max_position_embeddings=config.get("max_position_embeddings"))
        self.max_length_limit = _max_length_limit(self.tokenizer, positions)

    def forward(self, encoded: Mapping[str, Any]) -> np.ndarray:
        """Logits for already-tokenized inputs (only the graph's declared inputs, as int64)."""
        feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names}
        return self.session.run([self.output_name], feed)[0]

    def num_parameters(self) -> int:
        """Values in weight initializers (int8 ones included; scales and zero points skipped)."""
        graph = onnx.load(str(self.model_dir / ONNX_FILE), load_external_data=False).graph
        return sum(int(np.prod(t.dims)) for t in graph.initializer
                   if len(t.dims) >= 2 and int(np.prod(t.dims)) >= 64)


class SklearnClassifier(_TextRunner):
    """Runs the floor (``floor.npz`` + ``floor.json``: TF-IDF + logistic regression); featurisation is inside
    ``forward``."""

    return_tensors = "np"

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.pipeline = load_floor(self.model_dir)
        self.tokenizer = PassThroughTokenizer()
        self.num_labels = len(self.pipeline.classes_)
        self.max_length_limit = self.tokenizer.model_max_length

    def forward(self, encoded: Mapping[str, Any]) -> np.ndarray:
        """Log-probabilities per class (same argmax as logits), from raw texts."""
        return self.pipeline.predict_log_proba(encoded["texts"])

    def num_parameters(self) -> int:
        return floor_parameters(self.pipeline)


def _max_length_limit(tokenizer, config) -> int:
    # Tokenizers saved without model_max_length report ~1e30; the position table is the limit.
    limits = [x for x in (getattr(config, "max_position_embeddings", None),
                          tokenizer.model_max_length)
              if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits, default=1_000_000)


def encode(runner, texts: Sequence[str], max_length: int):
    """Truncate at ``max_length``, pad to the longest text in the batch (not to max_length)."""
    return runner.tokenizer(list(texts), truncation=True, max_length=max_length,
                            padding="longest", return_tensors=runner.return_tensors)


def require_model_dir(model_dir: Path) -> None:
    if not (Path(model_dir) / CONFIG_FILE).is_file():
        what = "does not exist" if not Path(model_dir).is_dir() else f"has no {CONFIG_FILE}"
        raise MissingArtifactError(
            f"Model folder {model_dir} {what}. Train the teacher first: "
            "`python -m flows.teacher` (or `dvc repro teacher`)."
        )


def open_model(model_dir: Path, threads: int = 1):
    """The runner for what ``model_dir`` holds; unknown contents are a ``ModelSourceError``.

    ``threads`` sets ONNX Runtime's intra-op threads (PyTorch's are set around each measurement).
    """
    model_dir = Path(model_dir)
    require_model_dir(model_dir)
    names = {p.name for p in model_dir.iterdir()}
    # Checked before torch weights, since an export folder may also keep them.
    if ONNX_FILE in names:
        return OnnxClassifier(model_dir, threads)
    if FLOOR_FILE in names or LEGACY_FLOOR_FILE in names:  # an old pickled floor: load_floor refuses it by name
        return SklearnClassifier(model_dir)
    if names & TORCH_WEIGHT_FILES:
        return TorchClassifier(model_dir)
    raise ModelSourceError(
        f"Don't know how to run {model_dir}: expected {ONNX_FILE}, {FLOOR_FILE}, model.safetensors or "
        f"pytorch_model.bin next to {CONFIG_FILE}, found {sorted(names)}."
    )
