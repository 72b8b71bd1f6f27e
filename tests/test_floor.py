"""The floor (TF-IDF + logistic regression): trained on the same split, measured by the same code."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from bertshrink.config.params import EvaluateParams, FloorParams, parse_params
from bertshrink.errors import ModelSourceError, ParamsError
from bertshrink.evaluation.floor import build_pipeline, save_floor, train_floor
from bertshrink.evaluation.metrics import evaluate_model
from bertshrink.modelfolder.files import CONFIG_FILE, FLOOR_FILE, FLOOR_SPEC_FILE, LEGACY_FLOOR_FILE, META_FILE
from bertshrink.modelfolder.floor_format import PassThroughTokenizer, load_floor, save_floor_folder
from bertshrink.modelfolder.meta import ModelMeta
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
    assert result["size"]["files"][FLOOR_SPEC_FILE] > 0  # the vocabulary is part of what ships
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


# --- the floor is stored as data: saved and loaded without pickles ---------------------------------

KNOWN = ["goal match team coach", "market stock price bank", "actor movie director oscar", "the a of", ""]


def test_saved_floor_predicts_exactly_as_the_fitted_one(floor_dir, prepared):
    params = FloorParams(c_values=(0.5, 8.0))
    fitted, _ = train_floor(prepared, params, seed=0)
    loaded = load_floor(floor_dir)
    texts = prepared.splits["test"]["text"].astype(str).tolist() + KNOWN
    assert np.array_equal(loaded.predict_log_proba(texts), fitted.predict_log_proba(texts))
    # known values: labels are the sorted names (film, money, sport); keywords give the topic away
    assert loaded.predict(KNOWN[:3]).tolist() == [2, 1, 0]
    assert loaded.named_steps["tfidf"].vocabulary_ == fitted.named_steps["tfidf"].vocabulary_


def test_binary_floor_round_trips_too(tmp_path):
    texts = ["good great fine", "great good", "fine good nice", "bad awful poor", "poor bad", "awful terrible bad"]
    fitted = build_pipeline(FloorParams(), c=4.0, seed=0).fit(texts, np.array([1, 1, 1, 0, 0, 0]))
    folder = save_floor_folder(fitted, ["neg", "pos"], ModelMeta(), tmp_path / "floor")
    loaded = load_floor(folder)
    probe = ["good", "bad poor", "nice awful", "unseen words"]
    assert np.array_equal(loaded.predict_proba(probe), fitted.predict_proba(probe))
    assert loaded.predict(["good great", "bad awful"]).tolist() == [1, 0]


def test_floor_folder_holds_plain_arrays_and_json_only(floor_dir):
    assert {p.name for p in floor_dir.iterdir()} == {FLOOR_FILE, FLOOR_SPEC_FILE, CONFIG_FILE, META_FILE}
    with np.load(floor_dir / FLOOR_FILE, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["classes", "coef", "idf", "intercept"]
        assert all(npz[name].dtype != object for name in npz.files)
    spec = json.loads((floor_dir / FLOOR_SPEC_FILE).read_text())
    assert spec["format_version"] == 1 and spec["tfidf"]["sublinear_tf"] is True
    assert len(spec["vocabulary"]) == len(set(spec["vocabulary"])) == np.load(floor_dir / FLOOR_FILE)["idf"].size


def test_a_floor_with_custom_code_is_not_saved(tmp_path, prepared):
    pipeline = build_pipeline(FloorParams(), c=1.0, seed=0).set_params(tfidf__preprocessor=str.lower)
    pipeline.fit(prepared.splits["train"]["text"].astype(str), prepared.splits["train"]["label"].to_numpy())
    with pytest.raises(ValueError, match="preprocessor"):
        save_floor_folder(pipeline, prepared.label_names, ModelMeta(), tmp_path / "floor")


class _TouchOnUnpickle:
    """Unpickling this creates ``path``: it stands for any code a tampered file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _pickle_at(place, marker):
    place.write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))


def _object_npz_at(place, marker):
    arrays = dict(np.load(place, allow_pickle=False))
    arrays["coef"] = np.array([_TouchOnUnpickle(marker)], dtype=object)
    with open(place, "wb") as out:  # np.savez would append ".npz" to a path without it
        np.savez(out, **arrays)


def _old_joblib_floor(place, marker):
    place.unlink()
    _pickle_at(place.with_name(LEGACY_FLOOR_FILE), marker)


@pytest.mark.parametrize("tamper, names", [
    (_pickle_at, FLOOR_FILE), (_object_npz_at, FLOOR_FILE), (_old_joblib_floor, LEGACY_FLOOR_FILE)])
def test_a_tampered_floor_file_is_refused_not_executed(tamper, names, floor_dir, tmp_path):
    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(marker)))
    assert marker.exists()  # the payload is live: unpickling it does run code
    marker.unlink()

    folder = shutil.copytree(floor_dir, tmp_path / "floor")
    tamper(folder / FLOOR_FILE, marker)
    with pytest.raises(ModelSourceError, match=rf"{names}.*pickle.*Re-run the floor stage.*dvc repro floor"):
        open_model(folder)
    assert not marker.exists()


def test_a_floor_description_that_does_not_fit_its_arrays_is_refused(floor_dir, tmp_path):
    folder = shutil.copytree(floor_dir, tmp_path / "floor")
    spec = json.loads((folder / FLOOR_SPEC_FILE).read_text())
    (folder / FLOOR_SPEC_FILE).write_text(json.dumps({**spec, "vocabulary": spec["vocabulary"][:-1]}))
    with pytest.raises(ModelSourceError, match=rf"{FLOOR_SPEC_FILE}.*does not rebuild.*idf length"):
        load_floor(folder)
    (folder / FLOOR_SPEC_FILE).write_text(json.dumps({**spec, "format_version": 99}))
    with pytest.raises(ModelSourceError, match="version-1 floor description"):
        load_floor(folder)


def test_a_regression_setting_a_later_scikit_learn_dropped_does_not_block_loading(floor_dir, tmp_path):
    folder = shutil.copytree(floor_dir, tmp_path / "floor")
    spec = json.loads((folder / FLOOR_SPEC_FILE).read_text())
    spec["logreg"]["a_setting_from_another_version"] = 1  # predicting uses only the arrays
    (folder / FLOOR_SPEC_FILE).write_text(json.dumps(spec))
    texts = KNOWN + ["striker cup league"]
    assert np.array_equal(load_floor(folder).predict_log_proba(texts), load_floor(floor_dir).predict_log_proba(texts))
