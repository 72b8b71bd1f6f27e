"""Shared fixtures: a tiny random BERT built in the test (no downloads) and a toy labelled corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

TOPICS = {
    "sport": ["goal", "match", "team", "coach", "league", "striker", "score", "cup"],
    "money": ["market", "stock", "price", "bank", "profit", "shares", "trade", "growth"],
    "film": ["actor", "movie", "director", "oscar", "cinema", "scene", "drama", "star"],
}
FILLER = ["the", "a", "of", "and", "in", "was", "is", "on", "with", "for", "new", "this"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_corpus(rows_per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    """Distinct short texts whose topic is given away by its keywords."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < rows_per_class * len(TOPICS):
        for label, words in TOPICS.items():
            text = " ".join(rng.choice(words + FILLER) for _ in range(rng.randint(6, 14)))
            text = f"{rng.choice(words)} {text} {rng.choice(words)}"
            if text not in seen and sum(r["label"] == label for r in rows) < rows_per_class:
                seen.add(text)
                rows.append({"text": text, "label": label})
    return pd.DataFrame(rows)


def build_tiny_bert(folder: Path, num_labels: int | None = None) -> Path:
    """A 2-layer, hidden-32 BERT with a WordPiece vocab of the toy corpus, saved to ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + words + chars + [f"##{c}" for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the WordPiece vocab as a dict (the v4 `vocab_file=` is ignored there).
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels or 2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config) if num_labels else BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def toy_raw(rows_per_class: int = 40):
    """The toy corpus as a raw dataset with int labels (names sorted), one train split."""
    from bertshrink.data.sources import RawDataset

    frame = toy_corpus(rows_per_class)
    names = sorted(frame["label"].unique())
    frame["label"] = frame["label"].map({n: i for i, n in enumerate(names)})
    return RawDataset({"train": frame}, names, "toy")


@pytest.fixture(scope="session")
def prepared():
    """Seeded train/validation/test splits of a 90-row toy corpus (read-only; shared)."""
    from bertshrink.data.prepare import prepare_splits
    from bertshrink.config.params import DataParams

    return prepare_splits(toy_raw(30), DataParams(), seed=0)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A plain tiny BERT encoder (no head), like the packaged all-MiniLM-L6-v2."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    path = tmp_path / "toy.csv"
    toy_corpus().to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """A throwaway Prefect API for flow tests (never the user's)."""
    import os

    # Telemetry heartbeats race the harness's SQLite ("database is locked") and need network.
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
