"""The real packaged all-MiniLM-L6-v2 loads offline and classifies; CLIs fail with clear exits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bertshrink.errors import ModelSourceError, ParamsError
from bertshrink.modelfolder.load import load_tokenizer_and_classifier
from conftest import run_module


@pytest.mark.slow
def test_packaged_minilm_loads_offline_and_classifies(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # proves no Hub access is needed
    labels = ["business", "entertainment", "politics", "sports", "tech"]
    tokenizer, model = load_tokenizer_and_classifier("packaged:all-MiniLM-L6-v2", labels, max_length=128)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tokenizer(["The striker scored twice as United won the cup final."], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    assert model.config.id2label[int(logits.argmax())] in labels
    # the encoder weights are the packaged ones, not a random init: same embedding every load
    _, again = load_tokenizer_and_classifier("packaged:all-MiniLM-L6-v2", labels, max_length=128)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, again.bert.embeddings.word_embeddings.weight)


@pytest.mark.slow
def test_unreachable_hub_model_explains_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="packaged:all-MiniLM-L6-v2"):
        load_tokenizer_and_classifier("surely-not-cached/bert-model-xyz", ["a", "b"], max_length=32)




@pytest.mark.slow
def test_bad_params_exit_2_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("teacher:\n  epochs: -1\n  learnig_rate: 0.1\n")
    done = run_module(["-m", "flows.pipeline"], tmp_path)
    assert done.returncode == ParamsError.exit_code
    assert "teacher.epochs" in done.stderr and "greater than 0" in done.stderr
    assert "teacher.learnig_rate: unknown key" in done.stderr and "learning_rate" in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_recipe_impossible_for_the_teacher_exits_2_before_training(tmp_path):
    """The packaged MiniLM has 6 layers and 12 heads per layer: checked from its config up front."""
    (tmp_path / "params.yaml").write_text(
        "compress:\n  recipes:\n    gone: [{drop_layers: {strategy: top, n_drop: 6}}]\n"
        "    ok: [{distill: {student_layers: 3}}]\n"
        "    heads: [{prune_heads: {count: 70}}]\n")
    done = run_module(["-m", "flows.pipeline"], tmp_path)
    assert done.returncode == ParamsError.exit_code, done.stderr[-2000:]
    assert "compress.recipes.gone[0].drop_layers: drops 6 of 6 layers" in done.stderr
    assert "compress.recipes.heads[0].prune_heads: count 70" in done.stderr and "recipes.ok" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_non_bert_teacher_is_refused_before_any_work(tmp_path):
    """A GPT-2 folder as teacher.model: named, with the supported families, exit 4, nothing written."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "params.yaml").write_text(f"teacher:\n  model: {tmp_path / 'gpt2'}\n")
    done = run_module(["-m", "flows.pipeline"], tmp_path)
    assert done.returncode == ModelSourceError.exit_code, done.stderr[-2000:]
    assert "is a gpt2 model; bertshrink supports the BERT-family encoders BERT, RoBERTa" in done.stderr
    assert "KeyError" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_stage_without_its_input_names_the_missing_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    done = run_module(["-m", "flows.register"], tmp_path)
    assert done.returncode == 7, done.stderr[-2000:]
    assert "Run the teacher stage first" in done.stderr


def test_the_interruption_message_says_whether_a_rerun_resumes(tmp_path, monkeypatch):
    """Issue 13, row 5: "rerun to resume" only when a checkpoint exists."""
    from flows._cli import interrupted_message

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("base:\n  checkpoints_dir: ckpt\n")
    assert interrupted_message("params.yaml").endswith("no training checkpoint had been written yet, so a rerun "
                                                       "starts that training over.")
    (tmp_path / "ckpt" / "teacher" / "checkpoint-50").mkdir(parents=True)
    assert interrupted_message("params.yaml").endswith(
        f"a rerun resumes training from {Path('ckpt') / 'teacher' / 'checkpoint-50'}.")
