"""MLflow pyfunc model for classifiers that transformers cannot rebuild from their config alone.

Head- and FFN-pruned models have per-layer shapes (``bertshrink/modelfolder/structure.py``), so MLflow's
transformers flavour, which reloads with ``from_pretrained``, cannot serve them. This file is
logged as "model from code" (MLflow executes it when loading, with ``bertshrink/`` on the path via
``code_paths``); the model folder itself is the artifact ``model_dir``.

Output columns match the transformers flavour's text-classification output: ``label``, ``score``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import torch

from bertshrink.modelfolder.load import load_classifier, load_tokenizer
from bertshrink.modelfolder.meta import read_meta_or_default


class BertshrinkClassifier(mlflow.pyfunc.PythonModel):
    """Text in (a list of strings, or a frame with a ``text`` column), label and score out."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["model_dir"])
        self.model = load_classifier(folder).eval()
        self.tokenizer = load_tokenizer(folder)
        meta = read_meta_or_default(folder)
        self.labels = meta.label_names or [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length = int(meta.max_length or 128)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):  # MLflow turns a list of strings into one column
            column = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = model_input[column].tolist()
        else:
            texts = list(model_input)
        batch = self.tokenizer([str(t) for t in texts], truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt")
        with torch.inference_mode():
            probabilities = self.model(**batch).logits.softmax(dim=-1)
        scores, ids = probabilities.max(dim=-1)
        return pd.DataFrame({"label": [self.labels[i] for i in ids.tolist()], "score": scores.tolist()})


mlflow.models.set_model(BertshrinkClassifier())
