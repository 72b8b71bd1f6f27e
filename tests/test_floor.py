"""The floor (TF-IDF + logistic regression): trained on the same split, measured by the same code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertshrink.config.params import EvaluateParams, FloorParams, parse_params
from bertshrink.errors import ParamsError
from bertshrink.evaluation.floor import save_floor, train_floor
from bertshrink.evaluation.metrics import evaluate_model
from bertshrink.modelfolder.files import FLOOR_FILE
from bertshrink.modelfolder.floor_format import PassThroughTokenizer
from bertshrink.modelfolder.runners import SklearnClassifier, open_model

FAST = EvaluateParams(warmup_iterations=1, timed_iterations=3, batch_sizes=(1, 4), max_length=32)


@pytest.fixture(scope="module")
def floor_dir(prepared, tmp_path_factory):
    params = FloorParams(c_values=(0.5, 8.0))
    pipeline, search = train_floor(prepared, params, seed=0)
    return save_floor(pipeline, prepared, params, search, tmp_path_factory.mktemp("m") / "floor")


def test_floor_picks_c_on_validation_and_writes_a_model_folder(floor_dir, prepared):
    meta = json.loads((floor_dir / "bertshrink.json").read_text())
    assert meta["kind"] == "floor" and meta["format"] == "sklearn"
    assert meta["chosen_c"] in (0.5, 8.0) and set(meta["validation_accuracy_by_c"]) == {"0.5", "8.0"}
    assert meta["validation_accuracy_by_c"][str(meta["chosen_c"])] == max(meta["validation_accuracy_by_c"].values())
    config = json.loads((floor_dir / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(prepared.label_names)}
    assert not list(floor_dir.parent.glob(".floor.*"))  # the temp folder was swapped in, not left behind


@pytest.mark.slow
def test_floor_is_measured_like_the_teacher(floor_dir, prepared):
    result = evaluate_model(floor_dir, prepared.splits, FAST, seed=0)
    # keyword topics: a bag of words separates them
    assert result["metrics"]["test"]["accuracy"] >= 0.9
    assert result["size"]["files"][FLOOR_FILE] > 0 and result["size"]["total_bytes"] >= result["size"]["files"][FLOOR_FILE]
    assert result["parameters"] > 0
    assert result["latency"]["batch_4"]["p50_ms"] > 0 and result["latency"]["batch_1"]["mean_seq_len"] > 1


def test_runner_featurises_inside_the_timed_forward(floor_dir, prepared):
    runner = open_model(floor_dir, FAST.threads)
    assert isinstance(runner, SklearnClassifier)
    texts = prepared.splits["test"]["text"].tolist()[:5]
    encoded = runner.tokenizer(texts, truncation=True, max_length=32, padding="longest", return_tensors="np")
    assert encoded["texts"] == texts  # raw texts reach forward(): TF-IDF is part of what is timed
    assert encoded["input_ids"].shape == (5, max(len(t.split()) for t in texts))
    logits = runner.forward(encoded)
    assert logits.shape == (5, len(prepared.label_names))
    assert np.allclose(np.exp(logits).sum(axis=1), 1.0)


def test_pass_through_tokenizer_hands_whole_texts_on_with_a_word_count_shape():
    texts = ["goal match team coach", "the market", "actor"]
    encoded = PassThroughTokenizer()(texts, truncation=True, max_length=2, padding="longest", return_tensors="np")
    # Not truncated at max_length: TF-IDF featurises the whole text inside the timed forward.
    assert encoded["texts"] == texts
    assert encoded["input_ids"].shape == (3, 4) and encoded["input_ids"].dtype == np.int64
    assert PassThroughTokenizer()([])["input_ids"].shape == (0, 0)


def test_bad_floor_params_are_rejected_by_name():
    with pytest.raises(ParamsError, match="c_values"):
        parse_params({"floor": {"c_values": [1.0, -2.0]}})
    with pytest.raises(ParamsError, match="ngram_max"):
        parse_params({"floor": {"ngram_max": 7}})
