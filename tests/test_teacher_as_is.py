"""``teacher.train: false``: a fine-tuned classifier taken as it is (issue 14, item 1), on tiny
random BERTs built in the test."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bertshrink.config.params import TeacherParams
from bertshrink.errors import ModelSourceError
from bertshrink.modelfolder.load import load_classifier, load_tokenizer
from bertshrink.modelfolder.meta import read_meta
from bertshrink.training.finetune import train_teacher
from conftest import build_tiny_bert, tiny_bert_model, toy_tokenizer


def _classifier(folder, id2label: dict[int, str]):
    """A 'fine-tuned' classifier folder whose outputs are named ``id2label``."""
    model = tiny_bert_model(len(id2label), seed=3)
    model.config.id2label = id2label
    model.config.label2id = {name: i for i, name in id2label.items()}
    model.save_pretrained(folder)
    toy_tokenizer().save_pretrained(folder)
    return folder, model


def _logits(model, tokenizer, texts) -> torch.Tensor:
    with torch.inference_mode():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_a_fine_tuned_classifier_is_taken_as_is_with_its_outputs_in_the_datas_order(tmp_path, prepared):
    assert prepared.label_names == ["film", "money", "sport"]
    folder, original = _classifier(tmp_path / "mine", {0: "sport", 1: "film", 2: "money"})
    teacher = TeacherParams(model=str(folder), train=False, max_length=32)
    result = train_teacher(prepared, teacher, tmp_path / "teacher", tmp_path / "checkpoints", seed=0)

    adopted, tokenizer = load_classifier(result.model_dir), load_tokenizer(result.model_dir)
    texts = prepared.splits["test"]["text"].tolist()[:8]
    before, after = _logits(original, tokenizer, texts), _logits(adopted, tokenizer, texts)
    # film, money, sport were the model's outputs 1, 2, 0: the same numbers, in the data's order
    assert torch.equal(after, before[:, [1, 2, 0]])
    assert adopted.config.id2label == {0: "film", 1: "money", 2: "sport"}
    meta = read_meta(result.model_dir)
    assert meta.kind == "teacher" and meta.params == {"train": False} and meta.label_names == prepared.label_names
    assert result.metrics == {} and not (tmp_path / "checkpoints").exists()  # nothing was trained


def test_other_label_names_stop_the_run_listing_both_sets(tmp_path, prepared):
    folder, _ = _classifier(tmp_path / "mine", {0: "negative", 1: "positive"})
    with pytest.raises(ModelSourceError, match=re.escape("the model has 2 ['negative', 'positive'], the data 3 "
                                                         "['film', 'money', 'sport']")):
        train_teacher(prepared, TeacherParams(model=str(folder), train=False), tmp_path / "teacher",
                      tmp_path / "checkpoints", seed=0)
    assert not (tmp_path / "teacher").exists()


def test_a_bare_encoder_or_a_head_without_weights_is_refused(tmp_path, prepared):
    encoder = build_tiny_bert(tmp_path / "encoder")  # BertModel: no classification head at all
    with pytest.raises(ModelSourceError, match=r"is not a fine-tuned sequence classifier .*architectures: \['BertModel'\]"):
        train_teacher(prepared, TeacherParams(model=str(encoder), train=False), tmp_path / "t1", tmp_path / "c", seed=0)
    # a config that claims a classifier over weights that have none (an encoder re-labelled)
    config = json.loads((encoder / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "film", "1": "money", "2": "sport"})
    (encoder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="has no weights for its classification head .*classifier.weight"):
        train_teacher(prepared, TeacherParams(model=str(encoder), train=False), tmp_path / "t2", tmp_path / "c", seed=0)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()
