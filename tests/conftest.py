"""Shared fixtures: a tiny random BERT built in the test (no downloads) and a toy labelled corpus."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

# A real PostgreSQL and MLflow tracking server for the session (postgres, mlflow_server, mlflow_tracking_uri).
from service_fixtures import mlflow_server, mlflow_tracking_uri, postgres, services_home  # noqa: F401

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


def toy_vocab() -> list[str]:
    """Special tokens, every toy-corpus word, and their characters (so most lowercase words tokenize)."""
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    chars = sorted({c for w in words for c in w})
    return SPECIAL_TOKENS + words + chars + [f"##{c}" for c in chars]


def toy_tokenizer():
    """A WordPiece tokenizer over ``toy_vocab`` (transformers 5 takes the vocab as a dict)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={token: i for i, token in enumerate(toy_vocab())}, do_lower_case=True)


def tiny_bert_model(num_labels: int | None = 2, *, vocab_size: int | None = None, hidden: int = 32, layers: int = 2,
                    heads: int = 2, intermediate: int = 37, dropout: float = 0.1, seed: int = 0):
    """A random BERT classifier (``num_labels``) or bare encoder (``None``), seeded, in eval mode;
    ``dropout=0`` makes training-mode forward passes deterministic.

    The one model factory of the test suite: every test builds its tiny model here.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=vocab_size or len(toy_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=64,
                        num_labels=num_labels or 2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config) if num_labels else BertModel(config)
    return model.eval()


# model_type -> (transformers config class, tokenizer kind, config settings beyond the common shape).
# The tiny configs keep each family's distinguishing parts: ELECTRA's and ALBERT's narrower
# embeddings, DeBERTa-v3's relative attention, ModernBERT's local/global layers and gated FFN.
FAMILY_MODELS = {
    "bert": ("BertConfig", "wordpiece", {}),
    "roberta": ("RobertaConfig", "bpe", {}),
    "xlm-roberta": ("XLMRobertaConfig", "unigram", {}),
    "electra": ("ElectraConfig", "wordpiece", {"embedding_size": 16}),
    "distilbert": ("DistilBertConfig", "wordpiece", {}),
    "albert": ("AlbertConfig", "unigram", {"embedding_size": 16}),
    "deberta-v2": ("DebertaV2Config", "unigram", {
        "relative_attention": True, "position_buckets": 8, "max_relative_positions": -1,
        "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "share_att_key": True,
        "norm_rel_ebd": "layer_norm"}),
    "modernbert": ("ModernBertConfig", "bpe", {"global_attn_every_n_layers": 2, "local_attention": 8}),
}
OTHER_WORDS = ["weather", "rainfall", "mountains", "hospital", "quickly", "yellow", "kitchen", "zebra",
               "jumping", "vowels", "whiskey", "quartz"]
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
UNIGRAM_SPECIALS = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]  # ALBERT's ids 0..4


def family_tokenizer(kind: str, *, token_types: bool = True):
    """A tokenizer of ``kind`` trained on the toy corpus in the test: 'wordpiece' (BERT), 'bpe'
    (byte-level, RoBERTa's specials and post-processing) or 'unigram' (SentencePiece-style, ALBERT's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    names = ["input_ids", "token_type_ids", "attention_mask"] if token_types else ["input_ids", "attention_mask"]
    if kind == "wordpiece":
        return BertTokenizerFast(vocab={token: i for i, token in enumerate(toy_vocab())}, do_lower_case=True,
                                 model_input_names=names)
    # Trained on more than the toy corpus, as real tokenizers are: vocabulary pruning has rows to drop.
    texts = toy_corpus()["text"].tolist() + [" ".join(OTHER_WORDS[i:] + OTHER_WORDS[:i]) for i in range(8)]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=400, special_tokens=BPE_SPECIALS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                       sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                       model_input_names=names)
    assert kind == "unigram", kind
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=150, special_tokens=UNIGRAM_SPECIALS,
                                                           unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="[MASK]", model_input_names=names)


def tiny_family_model(model_type: str, num_labels: int = 3, *, layers: int = 2, seed: int = 0):
    """A random classifier of ``model_type`` (a key of ``FAMILY_MODELS``) and its toy tokenizer:
    hidden 32, 4 heads of 8, FFN 37, seeded, in eval mode."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    config_class, kind, extra = FAMILY_MODELS[model_type]
    # DistilBERT and ModernBERT take no token types; their real tokenizers do not produce them.
    tokenizer = family_tokenizer(kind, token_types=model_type not in ("distilbert", "modernbert"))
    specials = {"pad_token_id": tokenizer.pad_token_id}
    if model_type == "modernbert":
        specials.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    shape = ({"dim": 32, "n_layers": layers, "n_heads": 4, "hidden_dim": 37} if model_type == "distilbert" else
             {"hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": 37})
    # initializer_range 0.3, not 0.02: logits of order 1, so a wrongly pruned head shows.
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), max_position_embeddings=64,
                                                 num_labels=num_labels, initializer_range=0.3,
                                                 **shape, **specials, **extra)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval(), tokenizer


def build_tiny_bert(folder: Path, num_labels: int | None = None, *, meta: dict | None = None, **shape) -> Path:
    """``tiny_bert_model(num_labels, **shape)`` and the toy tokenizer saved to ``folder``.

    With ``meta`` the folder is written through the model-folder API with that metadata (as the
    teacher stage writes it); without, it is a plain ``save_pretrained`` folder.
    """
    from bertshrink.modelfolder.meta import ModelMeta, save_model_folder

    folder = Path(folder)
    model, tokenizer = tiny_bert_model(num_labels, **shape), toy_tokenizer()
    if meta is not None:
        return save_model_folder(model, tokenizer, ModelMeta(**meta), folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_tiny_teacher(encoder: Path, prepared, root: Path, **knobs):
    """The toy corpus's teacher: ``encoder`` fine-tuned 20 epochs at 3e-3 (about 100% on the toy
    topics) into ``root/teacher``; ``knobs`` override the teacher params. Returns the TrainResult."""
    from bertshrink.config.params import TeacherParams
    from bertshrink.training.finetune import train_teacher

    params = TeacherParams(**{"model": str(encoder), "max_length": 32, "epochs": 20, "batch_size": 8,
                              "learning_rate": 3e-3, "warmup_ratio": 0.0, "save_steps": 1000, **knobs})
    return train_teacher(prepared, params, root / "teacher", root / "ckpt", seed=0)


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


def run_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd`` as a user runs it: this checkout on the path, a throwaway MLflow
    store in ``cwd``, and no Prefect API URL (the CLI starts its own temporary server)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{Path(cwd) / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def prefect_server():
    """A throwaway Prefect API for flow tests (never the user's)."""
    import os

    # Telemetry heartbeats race the harness's SQLite ("database is locked") and need network.
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
