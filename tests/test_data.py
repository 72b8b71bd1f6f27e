"""Sources and splitting: every source kind, determinism, stratification, no leakage, caps."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bertshrink.config.params import DataParams
from bertshrink.data.prepare import load_prepared, normalize_text, prepare_splits, write_prepared
from bertshrink.data.sources import RawDataset, load_raw_dataset
from bertshrink.errors import DataSourceError, MissingArtifactError, ModelSourceError
from bertshrink.modelfolder.sources import resolve_model_source
from conftest import toy_corpus, toy_raw


def test_packaged_bbc_news_is_the_full_corpus():
    raw = load_raw_dataset("packaged:bbc-news")
    assert raw.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(raw.splits["train"]) == 2225
    assert raw.splits["train"]["text"].str.len().min() > 100


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_files_with_named_columns(tmp_path, suffix):
    frame = toy_corpus(10).rename(columns={"text": "sentence", "label": "topic"})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    raw = load_raw_dataset(str(path), text_column="sentence", label_column="topic")
    assert raw.label_names == ["film", "money", "sport"]
    assert len(raw.splits["train"]) == 30
    assert set(raw.splits["train"]["label"]) == {0, 1, 2}


def test_folder_with_own_splits_is_reused(tmp_path):
    frame = toy_corpus(20)
    frame.iloc[:45].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[45:].to_csv(tmp_path / "dev.csv", index=False)
    raw = load_raw_dataset(str(tmp_path))
    assert set(raw.splits) == {"train", "validation"}
    prepared = prepare_splits(raw, DataParams(test_size=0.2), seed=1)
    assert prepared.meta["provenance"]["validation"].endswith("dev.csv")
    assert prepared.meta["provenance"]["test"].startswith("carved from train")
    assert len(prepared.splits["validation"]) == 15


def test_split_names_make_dev_the_test_split(tmp_path):
    """GLUE style: report on dev (as the papers do); validation is carved out of train instead."""
    frame = toy_corpus(20)
    frame.iloc[:45].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[45:].to_csv(tmp_path / "dev.csv", index=False)
    frame.iloc[:5].to_csv(tmp_path / "extra.csv", index=False)
    raw = load_raw_dataset(str(tmp_path), split_names={"dev": "test", "train": "train"})
    assert set(raw.splits) == {"train", "test"} and len(raw.splits["test"]) == 15
    prepared = prepare_splits(raw, DataParams(validation_size=0.2), seed=1)
    assert prepared.meta["provenance"]["test"].endswith("dev.csv")
    assert set(prepared.splits) == {"train", "validation", "test"} and len(prepared.splits["test"]) == 15
    assert set(load_raw_dataset(str(tmp_path), split_names={"dev": "ignore"}).splits) == {"train"}


def test_missing_column_names_the_fix(toy_csv):
    with pytest.raises(DataSourceError, match="data.text_column"):
        load_raw_dataset(str(toy_csv), text_column="body")


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(DataSourceError, match="neither packaged"):
        load_raw_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(DataSourceError, match="Unknown packaged dataset"):
        load_raw_dataset("packaged:imdb")


def test_a_dropped_hub_connection_gives_offline_advice_and_may_be_retried(monkeypatch):
    """The name resolves, the download fails: both spellings are named, and the error is transient."""
    import socket

    import datasets

    def dropped(*args, **kwargs):
        raise ConnectionError("huggingface.co unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    monkeypatch.setattr(datasets, "load_dataset", dropped)
    with pytest.raises(DataSourceError, match="network access to huggingface.co") as err:
        load_raw_dataset("hub:glue/sst2")
    assert "load_dataset('glue', 'sst2')" in str(err.value) and "load_dataset('glue/sst2', None)" in str(err.value)
    assert err.value.transient is True


def test_model_sources(tmp_path):
    packaged = Path(resolve_model_source("packaged:all-MiniLM-L6-v2"))
    assert (packaged / "config.json").is_file()
    assert json.loads((packaged / "config.json").read_text())["num_hidden_layers"] == 6
    assert resolve_model_source("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_source("hub:prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nothing"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="Unknown packaged model"):
        resolve_model_source("packaged:gpt-5")


def test_split_is_deterministic_and_seeded():
    a = prepare_splits(toy_raw(), DataParams(), seed=7)
    b = prepare_splits(toy_raw(), DataParams(), seed=7)
    c = prepare_splits(toy_raw(), DataParams(), seed=8)
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


def test_split_is_stratified_and_disjoint():
    prepared = prepare_splits(toy_raw(100), DataParams(validation_size=0.2, test_size=0.2), seed=0)
    rows = prepared.meta["rows"]
    assert rows == {"train": 180, "validation": 60, "test": 60}
    for split in ("validation", "test"):
        counts = prepared.splits[split]["label"].value_counts()
        assert counts.max() - counts.min() <= 1  # 20 per class, +-1 for rounding
    keys = {s: set(prepared.splits[s]["text"].map(normalize_text)) for s in prepared.splits}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_duplicates_are_dropped_before_splitting():
    raw = toy_raw()
    frame = raw.splits["train"]
    dupes = frame.iloc[:5].assign(text=lambda f: "  " + f["text"].str.upper() + " ")
    raw.splits["train"] = pd.concat([frame, dupes], ignore_index=True)
    prepared = prepare_splits(raw, DataParams(), seed=0)
    assert prepared.meta["dropped"]["duplicate"]["train"] == {"count": 5, "rows": [120, 121, 122, 123, 124]}
    assert sum(prepared.meta["rows"].values()) == 120


def test_duplicates_kept_when_asked():
    raw = toy_raw()
    raw.splits["train"] = pd.concat([raw.splits["train"], raw.splits["train"].iloc[:5]], ignore_index=True)
    prepared = prepare_splits(raw, DataParams(drop_duplicates=False), seed=0)
    assert sum(prepared.meta["rows"].values()) == 125


def test_train_rows_seen_in_evaluation_splits_are_dropped():
    frame = toy_raw().splits["train"]
    raw = RawDataset({"train": frame, "test": frame.iloc[:30].copy()}, ["film", "money", "sport"], "toy")
    prepared = prepare_splits(raw, DataParams(), seed=0)
    assert prepared.meta["dropped"]["in_evaluation_split"]["train"] == {"count": 30, "rows": list(range(20))}  # the first 20 listed
    assert len(prepared.splits["test"]) == 30


def test_caps_are_stratified():
    prepared = prepare_splits(toy_raw(100), DataParams(max_train_samples=30, max_eval_samples=12), seed=0)
    assert len(prepared.splits["train"]) == 30
    assert prepared.splits["train"]["label"].value_counts().to_dict() == {0: 10, 1: 10, 2: 10}
    assert len(prepared.splits["test"]) == 12 and len(prepared.splits["validation"]) == 12


def test_transfer_set_is_the_capped_out_training_texts_without_labels(tmp_path):
    params = DataParams(max_train_samples=30, max_eval_samples=12, transfer_samples=None)
    prepared = prepare_splits(toy_raw(100), params, seed=0)
    transfer, splits = prepared.transfer, prepared.splits
    assert list(transfer.columns) == ["text"]  # labels dropped: nothing can train on them by accident
    assert prepared.meta["rows"]["transfer"] == len(transfer) > 100
    used = {normalize_text(t) for name in ("train", "validation", "test") for t in splits[name]["text"]}
    assert not {normalize_text(t) for t in transfer["text"]} & used
    without = prepare_splits(toy_raw(100), DataParams(max_train_samples=30, max_eval_samples=12), seed=0)
    assert without.transfer is None and "transfer" not in without.meta["rows"]
    pd.testing.assert_frame_equal(without.splits["train"], splits["train"])  # the splits are unchanged
    assert without.content_hash != prepared.content_hash  # but the transfer texts are part of the data
    capped = prepare_splits(toy_raw(100), params.model_copy(update={"transfer_samples": 40}), seed=0)
    assert len(capped.transfer) == 40 and set(capped.transfer["text"]) <= set(transfer["text"])
    loaded = load_prepared(write_prepared(prepared, tmp_path / "prepared"))
    pd.testing.assert_frame_equal(loaded.transfer, transfer)
    assert loaded.content_hash == prepared.content_hash
    with pytest.raises(ValueError, match="transfer_samples"):
        DataParams(transfer_samples=-1)


def test_write_and_load_round_trip(tmp_path):
    prepared = prepare_splits(toy_raw(), DataParams(), seed=0)
    out = write_prepared(prepared, tmp_path / "prepared")
    loaded = load_prepared(out)
    assert loaded.content_hash == prepared.content_hash
    assert json.loads((out / "meta.json").read_text())["rows"] == prepared.meta["rows"]
    pd.testing.assert_frame_equal(loaded.splits["test"], prepared.splits["test"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # rewriting replaces the folder whole
    write_prepared(prepare_splits(toy_raw(), DataParams(), seed=1), out)
    assert load_prepared(out).content_hash != prepared.content_hash


def test_load_prepared_names_the_stage(tmp_path):
    with pytest.raises(MissingArtifactError, match="flows.prepare"):
        load_prepared(tmp_path / "nowhere")


SST2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2"


@pytest.mark.slow
@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="../shared/datasets/sst2 not present")
def test_shared_sst2_folder_loads_with_its_own_splits():
    raw = load_raw_dataset(str(SST2), text_column="sentence", label_column="label")
    assert raw.label_names == ["0", "1"]
    assert len(raw.splits["train"]) == 67349 and len(raw.splits["validation"]) == 872  # dev.tsv
    prepared = prepare_splits(raw, DataParams(max_train_samples=2000, max_eval_samples=500), seed=0)
    assert prepared.meta["rows"] == {"train": 2000, "validation": 500, "test": 500}
    assert prepared.meta["provenance"]["validation"].endswith("dev.tsv")


def test_a_model_of_another_family_is_refused_when_its_source_is_resolved(tmp_path):
    from transformers import BertConfig, GPT2Config

    from bertshrink.errors import ModelSourceError

    GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelSourceError, match=r"gpt2 is a gpt2 model; bertshrink supports the BERT-family encoders BERT, RoBERTa"):
        resolve_model_source(str(tmp_path / "gpt2"))
    BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    assert resolve_model_source(str(tmp_path / "bert")) == str(tmp_path / "bert")


def test_no_network_fails_in_milliseconds_naming_the_offline_switch(monkeypatch):
    """DNS failing (as it does offline) stops a Hub source at once, before any download attempt."""
    import socket
    import time

    import datasets

    from bertshrink.errors import DataSourceError, ModelSourceError
    from bertshrink.modelfolder.load import load_tokenizer_and_classifier

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("no download may be attempted without a network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(datasets, "load_dataset", never)
    started = time.perf_counter()
    with pytest.raises(DataSourceError, match=r"No network: huggingface.co cannot be resolved .* HF_HUB_OFFLINE=1"):
        load_raw_dataset("hub:glue/sst2")
    with pytest.raises(ModelSourceError, match=r"model 'bert-base-uncased' cannot be downloaded.*packaged:all-MiniLM"):
        load_tokenizer_and_classifier("bert-base-uncased", ["a", "b"], 32)
    assert time.perf_counter() - started < 2.0


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from bertshrink.errors import DataSourceError, MissingArtifactError, retry_only_transient

    dropped = DataSourceError("Could not load Hub dataset 'x': ConnectionError")
    dropped.transient = True
    assert retry_only_transient(None, None, Failed(data=dropped)) is True
    assert retry_only_transient(None, None, Failed(data=DataSourceError("data.source x.csv does not exist"))) is False
    assert retry_only_transient(None, None, Failed(data=MissingArtifactError("evaluate first"))) is False
    assert retry_only_transient(None, None, Failed(data=ConnectionError("tracking server reset"))) is True
    # an unexpected error (a bug, an unhandled input) fails the same way again: not retried
    assert retry_only_transient(None, None, Failed(data=ValueError("With n_samples=1, ..."))) is False


def _phrases_and_sentences():
    """120 toy texts of 8-16 words ("sentences") and up to 120 of 3 words ("phrases"), one train split."""
    sentences = toy_corpus(40, seed=0)
    phrases = toy_corpus(40, seed=1).assign(text=lambda f: f["text"].str.split().str[:3].str.join(" "))
    frame = pd.concat([sentences, phrases.drop_duplicates("text")], ignore_index=True)
    names = sorted(frame["label"].unique())
    frame["label"] = frame["label"].map({n: i for i, n in enumerate(names)})
    return RawDataset({"train": frame}, names, "toy"), int((frame["text"].str.split().str.len() == 3).sum())


def test_carve_min_words_carves_validation_and_test_from_long_rows_only():
    raw, n_phrases = _phrases_and_sentences()
    pool = len(raw.splits["train"])
    prepared = prepare_splits(raw, DataParams(validation_size=0.1, test_size=0.1, carve_min_words=8), seed=0)
    words = {name: prepared.splits[name]["text"].str.split().str.len() for name in ("train", "validation", "test")}
    for name in ("validation", "test"):
        assert words[name].min() >= 8
        assert abs(len(prepared.splits[name]) - 0.1 * pool) <= 1       # 10% of the whole pool, as without it
        assert ">= 8 words" in prepared.meta["provenance"][name]
    assert (words["train"] == 3).sum() == n_phrases > 50                # every phrase stays in train
    plain = prepare_splits(raw, DataParams(validation_size=0.1, test_size=0.1), seed=0)
    assert plain.splits["validation"]["text"].str.split().str.len().min() == 3  # without it, phrases get in
    with pytest.raises(DataSourceError, match=r"0 of toy's \d+ training rows are rows of >= 17 words "
                                              r"\(data.carve_min_words\): too few"):
        prepare_splits(raw, DataParams(carve_min_words=17), seed=0)


def test_carve_outermost_carves_only_texts_found_inside_no_other_row():
    # Like SST-2's train file: whole sentences and their phrases, some phrases long enough to be carved.
    sentences = [f"the {w} film is a sharp and moving story about loss" for w in ("first", "second", "third",
                                                                                    "fourth", "fifth", "sixth")]
    clauses = [s.split(" about ")[0] for s in sentences]          # 8 words, inside its sentence
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(sentences + clauses)]
    test = pd.DataFrame([{"text": "nothing like the others here", "label": 0}, {"text": "nor this", "label": 1}])
    raw = RawDataset({"train": pd.DataFrame(rows), "test": test}, ["neg", "pos"], "toy")
    params = DataParams(validation_size=0.25, carve_min_words=8, carve_outermost=True, drop_eval_spans=2)
    prepared = prepare_splits(raw, params, seed=0)
    validation = set(prepared.splits["validation"]["text"])
    assert validation and validation <= set(sentences)             # no clause: each sits inside a sentence
    left = prepared.splits["train"]["text"].tolist()
    assert not any(v.split(" about ")[0] in left for v in validation)  # their clauses went (drop_eval_spans)
    assert "inside no other row" in prepared.meta["provenance"]["validation"]
    nested = prepare_splits(raw, params.model_copy(update={"carve_outermost": False}), seed=0)
    assert set(nested.splits["validation"]["text"]) & set(clauses)   # without it, clauses are carved too
    with pytest.raises(ValueError, match="carve_outermost needs carve_min_words"):
        DataParams(carve_outermost=True)


def test_drop_eval_spans_removes_the_parts_of_evaluation_texts_from_train():
    sentences = ["a gorgeous and moving film about grief", "the plot is thin and the jokes fall flat",
                 "an utterly forgettable sequel", "warm funny and wise"]
    phrases = ["gorgeous and moving", "the jokes fall flat", "forgettable", "utterly forgettable sequel",
               "a thin plot", "moving film about", "Warm Funny"]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(sentences + phrases)]
    raw = RawDataset({"train": pd.DataFrame(rows[4:]), "test": pd.DataFrame(rows[:2]),
                      "validation": pd.DataFrame(rows[2:4])}, ["neg", "pos"], "toy")
    prepared = prepare_splits(raw, DataParams(drop_eval_spans=2), seed=0)
    # Runs of >= 2 words inside an evaluation text go, whatever the case; "forgettable" (1 word)
    # and "a thin plot" (not a run of "the plot is thin") stay.
    assert sorted(prepared.splits["train"]["text"]) == ["a thin plot", "forgettable"]
    assert "less 5 rows found inside evaluation texts" in prepared.meta["provenance"]["train"]
    kept_all = prepare_splits(raw, DataParams(), seed=0)
    assert len(kept_all.splits["train"]) == len(phrases)
