"""Tests for evaluation (metrics, latency, machine) and model-folder sizes and runners, on a tiny
random BERT from the conftest factory (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bertshrink.config.params import EvaluateParams
from bertshrink.errors import MissingArtifactError, ModelSourceError
from bertshrink.evaluation import latency, machine, metrics
from bertshrink.modelfolder.runners import TorchClassifier, open_model
from bertshrink.modelfolder.size import count_parameters, size_on_disk
from conftest import FILLER, TOPICS, build_tiny_bert, tiny_bert_model

WORDS = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))  # toy-corpus words: one token each
NUM_LABELS = 3
FAST = EvaluateParams(threads=1, batch_sizes=(1, 4), warmup_iterations=1, timed_iterations=5,
                      max_length=16, eval_batch_size=8, noise_retries=0)  # calls counted exactly: no re-timing


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The conftest tiny BERT (2 layers, hidden 32) with a 3-class head and the toy tokenizer."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", num_labels=NUM_LABELS)


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)]
    return pd.DataFrame({"text": texts, "label": rng.integers(0, NUM_LABELS, size=n)})


@pytest.fixture(scope="module")
def splits() -> dict[str, pd.DataFrame]:
    return {"train": _frame(8, 0), "validation": _frame(12, 1), "test": _frame(20, 2)}


def test_classification_metrics_known_values():
    # Per class F1: class 0 = 0.5, class 1 = 0.8, class 2 = 2/3 -> macro 59/90.
    result = metrics.classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 3)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["macro_f1"] == pytest.approx(59 / 90)
    assert result["n"] == 6


def test_classification_metrics_rejects_label_outside_model():
    with pytest.raises(ValueError, match="label 3 is outside the model's 3 classes"):
        metrics.classification_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        metrics.classification_metrics([0, 1, 2], [0, 1], 3)


def test_size_on_disk_counts_shipped_files_only(tiny_model, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (model_dir / "checkpoints" / "checkpoint-5" / "model.safetensors").write_bytes(b"x" * 999)
    (model_dir / "training_args.bin").write_bytes(b"x" * 777)
    (model_dir / "bertshrink.json").write_text("{}")

    size = size_on_disk(model_dir)

    assert set(size["files"]) == {"config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"}
    assert size["weights_bytes"] == (model_dir / "model.safetensors").stat().st_size
    assert size["total_bytes"] == sum(size["files"].values())
    assert size["total_bytes"] > size["weights_bytes"]


# Hand count for vocab 60, hidden 32, 2 layers, 2 heads, intermediate 37, 64 positions, 2 token types:
#   embeddings  60*32 + 64*32 + 2*32 + LayerNorm 2*32        = 1920 + 2048 + 64 + 64      =  4096
#   per layer   attention q, k, v, out 4*(32*32 + 32)        = 4224
#               + LayerNorm 2*32                             =   64
#               + FFN in 32*37 + 37, FFN out 37*32 + 32      = 1221 + 1216
#               + LayerNorm 2*32                             =   64   -> 6789, two layers   = 13578
#   pooler      32*32 + 32                                                                 =  1056
#   encoder (BertModel)                                      4096 + 13578 + 1056           = 18730
#   classifier  32*3 + 3                                                                   =    99
#   classifier model                                         18730 + 99                    = 18829
TINY_SHAPE = {"vocab_size": 60, "hidden": 32, "layers": 2, "heads": 2, "intermediate": 37}


def test_count_parameters_known_value():
    assert count_parameters(tiny_bert_model(None, **TINY_SHAPE)) == 18730
    assert count_parameters(tiny_bert_model(NUM_LABELS, **TINY_SHAPE)) == 18829


def test_runner_counts_the_parameters_of_the_folder(tmp_path):
    folder = build_tiny_bert(tmp_path / "m", num_labels=NUM_LABELS, **TINY_SHAPE)
    assert TorchClassifier(folder).num_parameters() == 18829
    assert open_model(folder).num_parameters() == 18829


def test_predict_shapes(tiny_model, splits):
    runner = TorchClassifier(tiny_model)
    texts = splits["test"]["text"].tolist()
    logits = runner.logits(texts, batch_size=7, max_length=16)
    assert logits.shape == (len(texts), NUM_LABELS)
    np.testing.assert_array_equal(runner.predict(texts, 7, 16), logits.argmax(-1))


def test_measure_latency(tiny_model, splits):
    runner = TorchClassifier(tiny_model)
    texts = splits["test"]["text"].tolist()
    threads_before = torch.get_num_threads()

    result = latency.measure_latency(runner, runner.tokenizer, texts, 4, FAST, seed=0)

    assert torch.get_num_threads() == threads_before
    assert result["batch_size"] == 4
    assert result["iterations"] == FAST.timed_iterations
    assert 0 < result["p50_ms"] <= result["p95_ms"]
    assert result["throughput_eps"] > 0
    assert 2 <= result["mean_seq_len"] <= FAST.max_length


def test_sample_sequence_lengths_seeded_and_truncated(tiny_model, splits):
    runner = TorchClassifier(tiny_model)
    texts = splits["test"]["text"].tolist()
    lengths = latency.sample_sequence_lengths(runner.tokenizer, texts, 16, n=50, seed=3)
    assert len(lengths) == 50
    assert all(3 <= n <= 16 for n in lengths)  # [CLS] word [SEP] at least
    assert lengths == latency.sample_sequence_lengths(runner.tokenizer, texts, 16, 50, 3)


def test_evaluate_model_and_flat_metrics(tiny_model, splits):
    result = metrics.evaluate_model(tiny_model, splits, FAST, seed=0)

    assert set(result) == {"model_dir", "metrics", "predictions", "parameters", "size", "latency",
                           "peak_memory_mb", "peak_memory_scope", "memory_baseline_mb",
                           "peak_memory_increase_mb", "machine", "eval_seconds"}
    assert set(result["metrics"]) == {"validation", "test"}
    for name, df in (("validation", splits["validation"]), ("test", splits["test"])):
        assert 0.0 <= result["metrics"][name]["accuracy"] <= 1.0
        assert result["metrics"][name]["n"] == len(df)
        # the predictions are the ones scored: they reproduce the accuracy
        hits = sum(int(p == y) for p, y in zip(result["predictions"][name], df["label"]))
        assert hits / len(df) == pytest.approx(result["metrics"][name]["accuracy"])
    assert set(result["latency"]) == {"batch_1", "batch_4"}
    assert result["peak_memory_mb"] > 0

    flat = metrics.flat_metrics(result)
    for key in ("test.accuracy", "validation.macro_f1", "latency.batch_1.p50_ms",
                "latency.batch_4.throughput_eps", "size.total_bytes", "parameters",
                "peak_memory_mb", "eval_seconds"):
        assert isinstance(flat[key], float), key
    assert not any(k.startswith(("machine", "size.files", "metrics", "predictions")) for k in flat)


def test_evaluate_model_missing_folder(tmp_path, splits):
    with pytest.raises(MissingArtifactError, match="flows.teacher") as err:
        metrics.evaluate_model(tmp_path / "nope", splits, FAST)
    assert str(tmp_path / "nope") in str(err.value)


def test_open_model_rejects_unknown_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="Don't know how to run"):
        open_model(tmp_path, FAST.threads)


def test_machine_info():
    info = machine.machine_info(threads=2)
    assert info["torch"] == torch.__version__
    assert info["threads"] == 2
    assert {"avx2", "avx512_vnni", "amx_tile"} <= set(info["cpu_flags"])
    assert all(isinstance(v, bool) for v in info["cpu_flags"].values())
    assert info["cpu_model"]


def test_peak_memory_can_be_reset_between_models():
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("peak reset uses /proc")
    big = np.ones(400_000_000 // 8)  # ~400 MB touched
    with_big = metrics.peak_memory_mb()
    del big
    assert metrics.reset_peak_memory() is True
    assert metrics.peak_memory_mb() < with_big - 200


def test_compare_latency_interleaves_models_on_the_same_batches(tiny_model, splits):
    """A model made 20 ms slower per call must show it; both see identical batches, interleaved."""
    import time

    calls = []

    class Recorded:
        """A real runner whose forward calls are logged (and, for "slow", delayed)."""

        def __init__(self, name):
            self.name, self.inner = name, TorchClassifier(tiny_model)
            self.tokenizer, self.return_tensors = self.inner.tokenizer, self.inner.return_tensors

        def forward(self, encoded):
            calls.append((self.name, encoded["input_ids"].tolist()))
            if self.name == "slow":
                time.sleep(0.02)
            return self.inner.forward(encoded)

    params = FAST.model_copy(update={"timed_iterations": 4, "warmup_iterations": 1, "batch_sizes": (2,)})
    runners = {"fast": Recorded("fast"), "slow": Recorded("slow")}
    result = latency.compare_latency({}, splits["test"]["text"].tolist(), params, runners=runners).latency

    fast, slow = result["fast"]["batch_2"], result["slow"]["batch_2"]
    assert fast["iterations"] == slow["iterations"] == 4
    assert slow["p50_ms"] >= fast["p50_ms"] + 15
    # every batch goes to both models back to back, and the order rotates batch by batch
    assert [name for name, _ in calls] == ["fast", "slow", "slow", "fast"] * 2 + ["fast", "slow"]
    assert all(calls[i][1] == calls[i + 1][1] for i in range(0, len(calls), 2))
    assert calls[0][1] != calls[2][1]  # and the batches differ from one iteration to the next


def test_text_to_label_latency_includes_tokenization_and_forward_only_excludes_it(tiny_model, splits):
    """A tokenizer made 20 ms slower per call shows in the text -> label figure, not in the
    forward-only one; a forward made 20 ms slower shows in both (issue 14, item 7)."""
    import time

    class SlowTokenizer:
        def __init__(self, inner, delay):
            self.inner, self.delay = inner, delay

        def __call__(self, *args, **kwargs):
            time.sleep(self.delay)
            return self.inner(*args, **kwargs)

    class Runner:
        def __init__(self, tokenize_delay, forward_delay):
            self.inner = TorchClassifier(tiny_model)
            self.tokenizer, self.return_tensors = SlowTokenizer(self.inner.tokenizer, tokenize_delay), "pt"
            self.forward_delay = forward_delay

        def forward(self, encoded):
            time.sleep(self.forward_delay)
            return self.inner.forward(encoded)

    params = FAST.model_copy(update={"timed_iterations": 4, "warmup_iterations": 1, "batch_sizes": (1,)})
    runners = {"slow-tokenizer": Runner(0.02, 0.0), "slow-forward": Runner(0.0, 0.02)}
    result = latency.compare_latency({}, splits["test"]["text"].tolist(), params, runners=runners).latency
    tokenizer, forward = result["slow-tokenizer"]["batch_1"], result["slow-forward"]["batch_1"]
    assert tokenizer["e2e_p50_ms"] >= tokenizer["p50_ms"] + 15  # the tokenizer's 20 ms: text -> label only
    assert forward["p50_ms"] >= 15 and forward["e2e_p50_ms"] >= forward["p50_ms"]
    assert forward["p50_ms"] >= tokenizer["p50_ms"] + 15
