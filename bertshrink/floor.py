"""The floor: a TF-IDF + logistic regression classifier trained on the same split.

It answers the question every compressed transformer must face ("is a transformer worth it here
at all?"). It is saved as a model folder (``model.joblib`` + ``config.json`` + ``bertshrink.json``)
and measured by the same evaluate code as the teacher: accuracy, size on disk, latency.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from bertshrink.data import PreparedData, replace_dir
from bertshrink.modeling import MODEL_META_FILE
from bertshrink.params import FloorParams

FLOOR_FILE = "model.joblib"
FLOOR_NAME = "floor"  # folder, metrics file and report label


def build_pipeline(params: FloorParams, c: float, seed: int) -> Pipeline:
    """TF-IDF (sublinear tf, word 1..n-grams) followed by a multinomial logistic regression."""
    return Pipeline([
        ("tfidf", TfidfVectorizer(ngram_range=(1, params.ngram_max), max_features=params.max_features,
                                  min_df=params.min_df, sublinear_tf=True)),
        ("logreg", LogisticRegression(C=c, max_iter=2000, random_state=seed)),
    ])


def train_floor(prepared: PreparedData, params: FloorParams, seed: int) -> tuple[Pipeline, dict]:
    """Fit on train for each C, keep the best on validation; returns the pipeline and the search."""
    train, validation = prepared.splits["train"], prepared.splits["validation"]
    scores = {}
    best, best_c = None, None
    for c in params.c_values:
        pipeline = build_pipeline(params, c, seed).fit(train["text"].astype(str), train["label"].to_numpy())
        scores[c] = float(np.mean(pipeline.predict(validation["text"].astype(str)) == validation["label"].to_numpy()))
        if best is None or scores[c] > scores[best_c]:
            best, best_c = pipeline, c
    return best, {"validation_accuracy_by_c": {str(c): s for c, s in scores.items()}, "chosen_c": best_c}


def save_floor(pipeline: Pipeline, prepared: PreparedData, params: FloorParams, search: dict,
               target: Path) -> Path:
    """Write the floor's folder atomically: the pipeline, a config naming the labels, our metadata."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joblib.dump(pipeline, tmp / FLOOR_FILE)
        labels = list(prepared.label_names)
        (tmp / "config.json").write_text(json.dumps({
            "model_type": "tfidf-logistic-regression", "num_labels": len(labels),
            "id2label": {str(i): n for i, n in enumerate(labels)}, "label2id": {n: i for i, n in enumerate(labels)},
        }, indent=2))
        meta: dict[str, Any] = {
            "kind": "floor", "format": "sklearn", "label_names": labels,
            "data_content_hash": prepared.content_hash, "params": params.model_dump(mode="json"), **search,
            "vocabulary_size": len(pipeline.named_steps["tfidf"].vocabulary_),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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


def load_floor(model_dir: Path) -> Pipeline:
    return joblib.load(Path(model_dir) / FLOOR_FILE)


def floor_parameters(pipeline: Pipeline) -> int:
    """Learned values: the logistic regression's weights and biases (the IDF vector counted too)."""
    logreg, tfidf = pipeline.named_steps["logreg"], pipeline.named_steps["tfidf"]
    return int(logreg.coef_.size + logreg.intercept_.size + tfidf.idf_.size)
