"""MLflow pyfunc model that serves any of our model folders with text: texts in, label and score out.

Head- and FFN-pruned models have per-layer shapes (``bertshrink/modelfolder/structure.py``), and
ONNX graphs take token ids, not text; MLflow's transformers and onnx flavours serve neither with
``{"inputs": ["some text"]}``. This file is logged as "model from code" (MLflow executes it when
loading, with ``bertshrink/`` on the path via ``code_paths``); the model folder itself, ONNX
graph and tokenizer included, is the artifact ``model_dir``. ``open_model`` runs it as evaluation
does, so a served version answers like the folder that was measured.

Output columns match the transformers flavour's text-classification output: ``label``, ``score``.
A bad request (no texts, a non-string, a text over ``MAX_TEXT_CHARS``) is refused with a
readable message and HTTP 400 (MLflow maps ``INVALID_PARAMETER_VALUE`` to it), not a stack trace.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from bertshrink.modelfolder.meta import read_meta_or_default
from bertshrink.modelfolder.runners import open_model

MAX_TEXT_CHARS = 100_000   # far beyond max_length tokens; a larger body is a client bug, not a text
BATCH_SIZE = 32


def texts_of(model_input) -> list[str]:
    """The request's texts (a list of strings, or a frame whose ``text`` or only column holds them),
    or an ``MlflowException`` (HTTP 400) saying what is wrong with them."""
    if isinstance(model_input, pd.DataFrame):  # MLflow turns {"inputs": [...]} into one column
        column = "text" if "text" in model_input.columns else model_input.columns[0] if len(model_input.columns) else None
        texts = [] if column is None else model_input[column].tolist()
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        texts = list(model_input)
    else:
        texts = [model_input]
    if not texts:
        raise MlflowException('No texts to classify: send {"inputs": ["a text", ...]}.', INVALID_PARAMETER_VALUE)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise MlflowException(f"inputs[{i}] is of type {type(text).__name__}, not a string: send texts.",
                                  INVALID_PARAMETER_VALUE)
        if len(text) > MAX_TEXT_CHARS:
            raise MlflowException(f"inputs[{i}] has {len(text):,} characters; at most {MAX_TEXT_CHARS:,} are "
                                  "accepted (the model reads only its first max_length tokens).",
                                  INVALID_PARAMETER_VALUE)
    return texts


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class BertshrinkClassifier(mlflow.pyfunc.PythonModel):
    """Text in (a list of strings, or a frame with a ``text`` column), label and score out."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["model_dir"])
        self.runner = open_model(folder)
        meta = read_meta_or_default(folder)
        self.labels = meta.label_names or [str(i) for i in range(self.runner.num_labels)]
        self.max_length = int(meta.max_length or 128)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        probabilities = softmax(self.runner.logits(texts_of(model_input), BATCH_SIZE, self.max_length))
        ids = probabilities.argmax(axis=-1)
        return pd.DataFrame({"label": [self.labels[i] for i in ids], "score": probabilities.max(axis=-1).tolist()})


mlflow.models.set_model(BertshrinkClassifier())
