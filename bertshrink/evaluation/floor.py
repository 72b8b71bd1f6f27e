"""The floor: a TF-IDF + logistic regression classifier trained on the same split.

It answers the question every compressed transformer must face ("is a transformer worth it here
at all?"). It is saved as a model folder (``modelfolder.floor_format``) and measured by the same evaluate
code as the teacher: accuracy, size on disk, latency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from bertshrink.config.params import FloorParams
from bertshrink.data.prepare import PreparedData
from bertshrink.modelfolder.floor_format import save_floor_folder
from bertshrink.modelfolder.meta import ModelMeta



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
    """Write the floor's folder atomically through the model-folder API."""
    meta = ModelMeta(data_content_hash=prepared.content_hash, params=params.model_dump(mode="json"),
                     validation_accuracy_by_c=search["validation_accuracy_by_c"], chosen_c=search["chosen_c"],
                     vocabulary_size=len(pipeline.named_steps["tfidf"].vocabulary_))
    return save_floor_folder(pipeline, prepared.label_names, meta, target)
