"""The floor's folder: a fitted TF-IDF + logistic regression pipeline, a small config naming the
labels, and ``bertshrink.json`` like every other model folder."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np

from bertshrink.modelfolder.files import CONFIG_FILE, FLOOR_FILE
from bertshrink.modelfolder.meta import ModelMeta, write_folder


class PassThroughTokenizer:
    """Hands raw texts to the floor, so its timed forward pass includes the TF-IDF featurisation.

    Transformers are timed without tokenization; for TF-IDF the featurisation is most of the work,
    so leaving it out would flatter the floor. ``input_ids`` only carries the shape (words).
    """

    model_max_length = 1_000_000

    def __call__(self, texts, truncation=True, max_length=None, padding=None, return_tensors=None, **_):
        texts = [str(t) for t in texts]
        longest = max((len(t.split()) for t in texts), default=0)
        return {"texts": texts, "input_ids": np.zeros((len(texts), longest), dtype=np.int64)}


def save_floor_folder(pipeline, label_names: list[str], meta: ModelMeta, target: Path) -> Path:
    """Write the floor's folder atomically: the pipeline, a config naming the labels, the metadata."""
    def fill(tmp: Path) -> ModelMeta:
        joblib.dump(pipeline, tmp / FLOOR_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({
            "model_type": "tfidf-logistic-regression", "num_labels": len(label_names),
            "id2label": {str(i): n for i, n in enumerate(label_names)},
            "label2id": {n: i for i, n in enumerate(label_names)},
        }, indent=2))
        return meta.updated(kind="floor", format="sklearn", label_names=list(label_names))

    return write_folder(target, fill)


def load_floor(model_dir: Path):
    return joblib.load(Path(model_dir) / FLOOR_FILE)


def floor_parameters(pipeline) -> int:
    """Learned values: the logistic regression's weights and biases (the IDF vector counted too)."""
    logreg, tfidf = pipeline.named_steps["logreg"], pipeline.named_steps["tfidf"]
    return int(logreg.coef_.size + logreg.intercept_.size + tfidf.idf_.size)
