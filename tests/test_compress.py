"""Recipes end to end on the tiny BERT: steps compose, shrink the model, and leave a candidate folder."""

from __future__ import annotations

import pytest
import torch

from bertshrink.compression.recipe import run_recipe
from bertshrink.config.params import parse_params
from bertshrink.modelfolder.load import load_folder
from bertshrink.modelfolder.meta import read_meta
from bertshrink.modelfolder.runners import OnnxClassifier, TorchClassifier, open_model
from conftest import train_tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_bert, prepared):
    return train_tiny_teacher(tiny_bert, prepared, tmp_path_factory.mktemp("teacher")).model_dir


def recipe(raw):
    return next(iter(parse_params({"compress": {"recipes": {"r": raw}}}).compress.recipes.values()))


@pytest.mark.slow
def test_two_step_recipe_prunes_then_recovers(tmp_path, teacher, prepared):
    records = run_recipe("heads-50", recipe([{"prune_heads": {"ratio": 0.5, "importance_batches": 2}},
                                            {"finetune": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 8}}]),
                         teacher, prepared, tmp_path / "candidates" / "heads-50", tmp_path / "work", seed=0, max_length=32)
    assert [r.kind for r in records] == ["prune_heads", "finetune"]
    assert records[0].parameters_after < records[0].parameters_before
    assert records[1].parameters_after == records[0].parameters_after  # fine-tuning keeps the shape
    candidate = tmp_path / "candidates" / "heads-50"
    meta = read_meta(candidate)
    assert meta.kind == "candidate" and meta.recipe == "heads-50"
    assert [s["kind"] for s in meta.recipe_steps] == ["prune_heads", "finetune"]
    assert meta.data_content_hash == prepared.content_hash
    assert meta.label_names == prepared.label_names
    assert not (tmp_path / "work").exists()
    # the same evaluation runner loads the pruned candidate (one head per layer left)
    runner = TorchClassifier(candidate)
    assert [layer.attention.self.num_attention_heads for layer in runner.model.bert.encoder.layer] == [1, 1]
    texts = prepared.splits["test"]["text"].tolist()
    predictions = runner.predict(texts, 8, 32)
    # the runner's class ids are the argmax of the saved model's own logits, one per test text
    model, tokenizer = load_folder(candidate)
    with torch.no_grad():
        expected = model(**tokenizer(texts, truncation=True, max_length=32, padding=True,
                                     return_tensors="pt")).logits.argmax(-1)
    assert predictions.tolist() == expected.tolist()
    assert set(predictions.tolist()) <= {0, 1, 2}
    # the teacher folder is untouched
    assert read_meta(teacher).kind == "teacher"


def test_structural_recipe_keeps_in_corpus_predictions(tmp_path, teacher, prepared):
    run_recipe("vocab", recipe(["prune_vocab"]), teacher, prepared, tmp_path / "vocab", tmp_path / "work", 0, 32)
    before, after = TorchClassifier(teacher), TorchClassifier(tmp_path / "vocab")
    texts = prepared.splits["train"]["text"].tolist()
    torch.testing.assert_close(after.logits(texts, 8, 32), before.logits(texts, 8, 32))
    rows = lambda r: r.model.bert.embeddings.word_embeddings.weight.shape[0]  # noqa: E731
    assert rows(after) < rows(before)


def test_failing_step_leaves_no_candidate(tmp_path, teacher, prepared):
    with pytest.raises(ValueError, match=r"Cannot drop layers \[0, 1\] of 2: at least one must go and one must stay"):
        run_recipe("bad", recipe([{"drop_layers": {"strategy": "explicit", "layers": [0, 1]}}]), teacher, prepared,
                   tmp_path / "bad", tmp_path / "work", 0, 32)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_drop_then_distill_recipe_end_to_end(tmp_path, teacher, prepared):
    """The two-step recipe of the issue: physically drop a layer, then distill the teacher into it."""
    steps = [{"drop_layers": {"strategy": "top", "n_drop": 1}},
             {"distill": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 8, "alpha_hidden": 1.0}}]
    records = run_recipe("drop-distill", recipe(steps), teacher, prepared, tmp_path / "cand", tmp_path / "work", 0, 32)
    assert [r.kind for r in records] == ["drop_layers", "distill"]
    assert records[0].parameters_after < records[0].parameters_before
    student, reference = TorchClassifier(tmp_path / "cand"), TorchClassifier(teacher)
    assert student.model.config.num_hidden_layers == 1
    texts = prepared.splits["validation"]["text"].tolist()
    agreement = (student.predict(texts, 8, 32) == reference.predict(texts, 8, 32)).mean()
    assert agreement >= 0.8


def test_head_pruned_student_can_be_distilled(tmp_path, teacher, prepared):
    steps = [{"prune_heads": {"count": 1, "importance_batches": 2}},
             {"distill": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}}]
    run_recipe("heads-distill", recipe(steps), teacher, prepared, tmp_path / "cand", tmp_path / "work", 0, 32)
    heads = [layer.attention.self.num_attention_heads for layer in TorchClassifier(tmp_path / "cand").model.bert.encoder.layer]
    assert sorted(heads) == [1, 2]


def test_factorized_candidate_loads_and_stays_close(tmp_path, teacher, prepared):
    """Full rank is an exact factorization: the candidate must predict as the teacher does."""
    hidden = TorchClassifier(teacher).model.config.hidden_size
    records = run_recipe("fact", recipe([{"factorize_embeddings": {"rank": hidden}}]), teacher, prepared,
                         tmp_path / "fact", tmp_path / "work", 0, 32)
    assert records[0].details["relative_error"] < 1e-5
    before, after = TorchClassifier(teacher), TorchClassifier(tmp_path / "fact")
    texts = prepared.splits["validation"]["text"].tolist()
    torch.testing.assert_close(after.logits(texts, 8, 32), before.logits(texts, 8, 32), atol=1e-4, rtol=1e-4)
    assert type(after.model.bert.embeddings.word_embeddings).__name__ == "FactorizedEmbedding"


def test_factorized_student_can_be_fine_tuned(tmp_path, teacher, prepared):
    """Recovery after factorization: the fine-tune step must load the factorised shape, not a full one."""
    steps = [{"factorize_embeddings": {"rank": 8}}, {"finetune": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}}]
    records = run_recipe("fact-ft", recipe(steps), teacher, prepared, tmp_path / "cand", tmp_path / "work", 0, 32)
    assert records[1].parameters_after == records[0].parameters_after < records[0].parameters_before
    model = TorchClassifier(tmp_path / "cand").model
    assert model.bert.embeddings.word_embeddings.low.weight.shape[1] == 8


@pytest.mark.slow
def test_qat_then_export_and_static_int8_end_to_end(tmp_path, teacher, prepared):
    """qat trains under fake quantization, export_onnx checks parity, static int8 records its calibration rows."""
    steps = [{"qat": {"method": "finetune", "epochs": 2, "learning_rate": 1e-3, "batch_size": 8}},
             {"export_onnx": {"parity_rows": 16}},
             {"quantize": {"mode": "static", "calibration": {"rows": 32, "method": "minmax"}}}]
    records = run_recipe("qat-int8", recipe(steps), teacher, prepared, tmp_path / "qat-int8", tmp_path / "work", 0, 32)
    assert [r.kind for r in records] == ["qat", "export_onnx", "quantize"]
    assert records[1].details["parity"]["agreement"] >= 0.995
    meta = read_meta(tmp_path / "qat-int8")
    calibration = meta.calibration
    assert calibration["split"] == "train" and calibration["rows"] == 32 and len(calibration["row_ids"]) == 32
    assert set(calibration["row_ids"]) <= set(prepared.splits["train"].index)
    assert meta.quantization["mode"] == "static" and meta.recipe == "qat-int8"
    runner = open_model(tmp_path / "qat-int8", threads=1)
    assert isinstance(runner, OnnxClassifier)
    texts = prepared.splits["test"]["text"].tolist()
    agreement = (runner.predict(texts, 8, 32) == TorchClassifier(teacher).predict(texts, 8, 32)).mean()
    assert agreement >= 0.8  # a tiny model quantized to int8 still mostly agrees with its teacher
    assert records[2].parameters_after == records[1].parameters_after  # int8 keeps the parameters


@pytest.mark.slow
def test_quant_noise_recipe_trains_and_torch_int8_quantizes(tmp_path, teacher, prepared):
    steps = [{"quant_noise": {"p": 0.5, "bits": 8, "epochs": 1, "learning_rate": 1e-3, "batch_size": 8}},
             {"quantize": {"backend": "torch", "mode": "int8_weight_only"}}]
    records = run_recipe("qn", recipe(steps), teacher, prepared, tmp_path / "qn", tmp_path / "work", 0, 32)
    assert [r.kind for r in records] == ["quant_noise", "quantize"]
    meta = read_meta(tmp_path / "qn")
    assert meta.quantization["backend"] == "torch" and meta.quantization["mode"] == "int8_weight_only"
    assert meta.torch_quantized and meta.format_label == "pytorch int8_weight_only"
    runner = TorchClassifier(tmp_path / "qn")
    texts = prepared.splits["test"]["text"].tolist()
    predictions = runner.predict(texts, 8, 32)
    assert set(predictions.tolist()) <= {0, 1, 2}
    agreement = (predictions == TorchClassifier(teacher).predict(texts, 8, 32)).mean()
    assert agreement >= 0.8  # trained with noise, then int8 weights: still mostly the teacher's answers


@pytest.mark.slow
def test_quant_noise_benchmark_compares_three_students_under_every_quantization(tmp_path, teacher, prepared):
    import json
    import sys
    from pathlib import Path

    import yaml

    from bertshrink.data.prepare import write_prepared

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import quant_noise

    write_prepared(prepared, tmp_path / "data/prepared")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"max_length": 32, "threads": 1}}))
    args = quant_noise.parse_args(["--params", str(params), "--root", str(tmp_path), "--student", str(teacher),
                                   "--epochs", "1", "--learning-rate", "1e-3", "--p", "0.5"])
    assert quant_noise.main_with(args) == 0
    result = json.loads((tmp_path / "reports/quant_noise.json").read_text())
    assert list(result["results"]) == ["ptq", "finetune", "quant-noise"]
    columns = ["fp32", "int8-scalar", "int4-scalar", "int3-scalar", "ort-int4", "ort-int8-dynamic"]
    for row in result["results"].values():
        assert all(0.0 <= row[c] <= 1.0 for c in columns)
    assert result["results"]["ptq"]["fp32"] >= 0.9  # the trained tiny teacher itself
    table = (tmp_path / "reports/quant_noise.md").read_text()
    assert "| quant-noise |" in table and "ort-int4" in table
    assert not (tmp_path / "checkpoints/quant_noise").exists()


def test_seeds_start_at_the_pipelines_own():
    from bertshrink.evaluation.repeats import seeds_for

    assert seeds_for(42, 3) == [42, 43, 44]


@pytest.mark.slow
def test_repeat_over_seeds_rebuilds_scores_and_cleans_up(teacher, prepared, tmp_path):
    """evaluate.seeds: the recipe rebuilt with other seeds, scored, summarised as mean and spread."""
    from bertshrink.config.params import EvaluateParams
    from bertshrink.evaluation.repeats import repeat_over_seeds

    fast = EvaluateParams(warmup_iterations=0, timed_iterations=1, batch_sizes=(1,), max_length=32)
    first = {"accuracy": 0.5, "macro_f1": 0.4, "agreement": 0.6}
    teacher_predictions = [0] * len(prepared.splits["test"])
    out = repeat_over_seeds("ft", recipe([{"finetune": {"epochs": 1, "learning_rate": 3e-3, "batch_size": 8}}]),
                            teacher, prepared, tmp_path / "seeds", first, base_seed=7, n_seeds=3, max_length=32,
                            params=fast, teacher_predictions=teacher_predictions)
    assert out["seeds"] == [7, 8, 9] and [r["seed"] for r in out["runs"]] == [7, 8, 9]
    assert out["runs"][0]["accuracy"] == 0.5  # the existing candidate is not rebuilt
    assert out["accuracy"]["n"] == 3 and out["accuracy"]["min"] <= out["accuracy"]["mean"] <= out["accuracy"]["max"]
    assert out["accuracy"]["std"] > 0  # the fake first score (0.5) differs from the trained ones
    for run in out["runs"][1:]:
        assert 0.0 <= run["agreement"] <= 1.0 and run["n"] == len(prepared.splits["test"])
        assert run["accuracy"] >= 0.8  # the rebuilt candidates are real, trained models
    assert not list((tmp_path / "seeds").glob("seed-*"))  # rebuilt models are scored, then removed
