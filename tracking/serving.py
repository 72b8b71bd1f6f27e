"""Load a registered model through MLflow, as a server would, and classify texts with it.

Every version bertshrink registers takes texts directly (transformers or our pyfunc model). ONNX
versions registered by older bertshrink (MLflow's onnx flavour) take tensors: the tokenizer and
label names registered beside the graph (``extra_files/``) turn the texts into them and the logits
back into labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from bertshrink.errors import MissingArtifactError


def download(model_uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(model_uri))


def is_onnx(local: Path) -> bool:
    return (local / "model.onnx").is_file() and (local / "extra_files").is_dir()


def classify_onnx(model, local: Path, texts: list[str], max_length: int) -> list[str]:
    """Tokenize with the registered tokenizer, run MLflow's onnx pyfunc, map argmax to label names."""
    import onnx
    from transformers import AutoTokenizer

    extra = local / "extra_files"
    tokenizer = AutoTokenizer.from_pretrained(str(extra))
    id2label = json.loads((extra / "config.json").read_text()).get("id2label", {})
    inputs = [i.name for i in onnx.load(str(local / "model.onnx"), load_external_data=False).graph.input]
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="np")
    outputs = model.predict({name: np.asarray(encoded[name], dtype=np.int64) for name in inputs})
    logits = next(iter(outputs.values())) if isinstance(outputs, dict) else np.asarray(outputs)
    return [id2label.get(str(i), str(i)) for i in np.asarray(logits).argmax(axis=-1)]


def load_registered(model_uri: str):
    """The model at ``model_uri`` as MLflow loads it for serving; a ``MissingArtifactError`` if absent."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise MissingArtifactError(f"No model at {model_uri} ({err.message.splitlines()[0]}). Check the name "
                                   "and alias in the MLflow UI (`make mlflow-ui`), or run the pipeline.") from None


def label_and_score(model, texts: list[str]) -> pd.DataFrame:
    """``label`` and ``score`` per text from a loaded text-in model (ours or transformers')."""
    out = model.predict(texts)
    frame = out if isinstance(out, pd.DataFrame) else pd.DataFrame(list(out))
    return frame[["label", "score"]].reset_index(drop=True)


def classify_registered(model_uri: str, texts: list[str], max_length: int = 128) -> list[str]:
    """Labels predicted by the registered model at ``model_uri`` (e.g. ``models:/name@champion``)."""
    local = download(model_uri)
    model = mlflow.pyfunc.load_model(str(local))
    if is_onnx(local):
        return classify_onnx(model, local, texts, max_length)
    return [str(label) for label in label_and_score(model, texts)["label"]]
