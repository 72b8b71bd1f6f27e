"""Compression recipes parse into typed steps; bad recipes fail at params time, naming recipe and step."""

import re

import pytest

from bertshrink.errors import ParamsError
from bertshrink.config.params import parse_params
from bertshrink.config.recipes import (DistillStep, DropLayersStep, PruneFfnStep, PruneHeadsStep, PruneVocabStep,
                                check_against_teacher)


def recipes(raw):
    return parse_params({"compress": {"recipes": raw}}).compress


def test_recipes_parse_into_typed_steps_in_order():
    parsed = recipes({
        "distill-3l": [{"distill": {"student_layers": 3}}],
        "heads-50": [{"prune_heads": {"ratio": 0.5}}, {"distill": {}}],
        "small": [{"drop_layers": {"strategy": "alternate", "n_drop": 3}}, {"prune_ffn": {"ratio": 0.5}},
                  {"distill": {"alpha_hidden": 1.0}}, "prune_vocab"],
    })
    small = parsed.recipes["small"].steps
    assert [type(s) for s in small] == [DropLayersStep, PruneFfnStep, DistillStep, PruneVocabStep]
    assert small[0].n_drop == 3 and small[2].alpha_hidden == 1.0 and small[2].temperature == 2.0
    assert isinstance(parsed.recipes["heads-50"].steps[0], PruneHeadsStep)


def test_default_params_have_no_recipes():
    assert parse_params({}).compress.recipes == {}


@pytest.mark.parametrize("raw, fragment", [
    ({"r1": [{"prune_layers": {}}]}, "compress.recipes.r1: Value error, unknown step 'prune_layers'"),
    ({"r1": [{"prune_heads": {"ratio": 1.0}}]}, "compress.recipes.r1[0].prune_heads.ratio"),
    ({"r1": [{"prune_heads": {}}]}, "give exactly one of ratio"),
    ({"r1": [{"distill": {"tempreature": 3}}]}, "compress.recipes.r1[0].distill.tempreature: unknown key"),
    ({"r1": [{"distill": {"alpha_ce": 0, "alpha_kd": 0}}]}, "at least one of alpha_ce"),
    ({"r1": [{"drop_layers": {"strategy": "explicit"}}]}, "needs a non-empty `layers` list"),
    ({"r1": [{"magnitude": {"sparsity": 1.0}}]}, "compress.recipes.r1[0].magnitude.sparsity"),
    ({"r1": []}, "compress.recipes.r1"),
    ({"bad name": ["prune_vocab"]}, "recipe name 'bad name'"),
    ({"teacher": ["prune_vocab"]}, "cannot be named 'teacher'"),
    ({"champion": ["prune_vocab"]}, "recipe name 'champion' is reserved"),
    ({"v2": ["prune_vocab"]}, "recipe name 'v2' is reserved"),
    ({"r1": ["prune_vocab", {"distill": {}}]}, "put prune_vocab after distill"),
    ({"r1": ["factorize_embeddings", "factorize_embeddings"]}, "factorised once"),
    ({"r1": [{"factorize_embeddings": {"rank": 0}}]}, "compress.recipes.r1[0].factorize_embeddings.rank"),
])
def test_bad_recipes_fail_naming_recipe_and_step(raw, fragment):
    with pytest.raises(ParamsError) as err:
        recipes(raw)
    assert fragment in str(err.value)


def test_a_step_key_typo_is_one_error_listing_the_steps_keys():
    """Issue 13, row 9: ``distill: {epoch: 1}`` names the key and lists what is allowed, without
    pydantic's consequential "Tuple should have at least 1 item" about the emptied recipe."""
    with pytest.raises(ParamsError) as err:
        recipes({"r1": [{"distill": {"epoch": 1}}]})
    problems = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, problems
    assert problems[0].startswith("  - compress.recipes.r1[0].distill.epoch: unknown key; allowed keys: ")
    assert "epochs" in problems[0] and "student_layers" in problems[0] and "kind" not in problems[0]
    assert "Tuple" not in str(err.value)


def test_impossible_numbers_against_the_teacher_shape():
    parsed = recipes({
        "all-layers": [{"drop_layers": {"strategy": "top", "n_drop": 6}}],
        "out-of-range": [{"drop_layers": {"strategy": "explicit", "layers": [0, 9]}}],
        "too-many-heads": [{"prune_heads": {"count": 70}}],
        "wide-student": [{"drop_layers": {"strategy": "top", "n_drop": 3}}, {"distill": {"student_layers": 4}}],
        "fine": [{"drop_layers": {"strategy": "top", "n_drop": 3}}, {"distill": {"student_layers": 2}}],
        "full-rank": [{"factorize_embeddings": {"rank": 384}}],
        "low-rank": [{"factorize_embeddings": {"rank": 128}}],
    })
    problems = check_against_teacher(parsed, num_layers=6, num_heads=12, hidden_size=384)
    text = "\n".join(problems)
    assert "compress.recipes.all-layers[0].drop_layers: drops 6 of 6 layers" in text
    assert "compress.recipes.out-of-range[0].drop_layers: layers [9] outside 0..5" in text
    assert "compress.recipes.too-many-heads[0].prune_heads: count 70" in text
    assert "compress.recipes.wide-student[1].distill: student_layers 4 > the 3 layers available" in text
    assert "compress.recipes.full-rank[0].factorize_embeddings: rank 384 >= embedding width 384 saves nothing" in text
    assert not [p for p in problems if "recipes.fine" in p or "recipes.low-rank" in p]


def test_quantization_steps_parse_with_their_defaults():
    from bertshrink.config.recipes import ExportOnnxStep, QatStep, QuantizeStep, QuantNoiseStep

    parsed = recipes({
        "baseline": ["export_onnx", {"quantize": {"mode": "dynamic"}}],
        "static": ["export_onnx", {"quantize": {"mode": "static", "calibration": {"rows": 64, "method": "entropy"},
                                                "keep_fp32": ["SkipLayerNormalization", "Add"]}}],
        "qat": [{"qat": {"epochs": 1}}, "export_onnx", {"quantize": {"mode": "static"}}],
        "noise": [{"quant_noise": {"p": 0.25, "bits": 4, "method": "finetune"}}, "export_onnx",
                  {"quantize": {"mode": "int4"}}],
        "torch": [{"quantize": {"backend": "torch", "mode": "fp16"}}],
    }).recipes
    export, quantize = parsed["baseline"].steps
    assert isinstance(export, ExportOnnxStep) and export.atol == 1e-3 and export.min_agreement == 0.995
    assert isinstance(quantize, QuantizeStep) and quantize.backend == "onnxruntime" and quantize.include_embeddings
    static = parsed["static"].steps[1]
    assert static.calibration.split == "train" and static.calibration.rows == 64 and static.calibration.method == "entropy"
    assert static.keep_fp32 == ("SkipLayerNormalization", "Add")
    assert isinstance(parsed["qat"].steps[0], QatStep) and parsed["qat"].steps[0].method == "distill"
    noise = parsed["noise"].steps[0]
    assert isinstance(noise, QuantNoiseStep) and (noise.p, noise.bits, noise.block_size) == (0.25, 4, 8)
    assert parsed["torch"].steps[0].mode == "fp16" and not parsed["torch"].steps[0].onnx


@pytest.mark.parametrize("steps, fragment", [
    (["quantize"], "needs an ONNX model: put export_onnx before it"),
    (["export_onnx", "prune_vocab"], "step 1 (prune_vocab) comes after export_onnx"),
    (["export_onnx", {"quantize": {"backend": "torch", "mode": "fp16"}}], "comes after export_onnx"),
    (["export_onnx", "export_onnx"], "export_onnx appears twice"),
    (["export_onnx", "quantize", "quantize"], "quantize appears twice"),
    ([{"quantize": {"backend": "torch", "mode": "fp16"}}, "prune_vocab"], "quantize must be the last step"),
    ([{"quantize": {"backend": "torch", "mode": "dynamic"}}], "mode 'dynamic' is not a torch mode"),
    (["export_onnx", {"quantize": {"mode": "int8_dynamic"}}], "not a onnxruntime mode"),
    (["export_onnx", {"quantize": {"mode": "dynamic", "keep_fp32": ["Add"]}}], "keep_fp32 applies to mode: static"),
    (["export_onnx", {"quantize": {"mode": "static", "calibration": {"split": "test"}}}],
     "calibration split 'test' is an evaluation split"),
    (["export_onnx", {"quantize": {"mode": "static", "calibration": {"split": "validation"}}}], "evaluation split"),
    (["export_onnx", {"quantize": {"mode": "static", "calibration": {"rows": 10}}}],
     "calibration rows 10 is too small: use at least 32"),
    (["prune_vocab", {"qat": {}}], "put prune_vocab after distill"),
    ([{"quant_noise": {"p": 0}}], "quant_noise.p"),
    ([{"quant_noise": {"bits": 2}}], "quant_noise.bits"),
])
def test_bad_quantization_recipes_fail_at_params_time(steps, fragment):
    with pytest.raises(ParamsError) as err:
        recipes({"r1": steps})
    assert fragment in str(err.value)


def test_finetune_may_follow_vocabulary_pruning():
    # fine-tuning reads with the model's own pruned tokenizer (e.g. to recover after factorization)
    steps = recipes({"r1": ["prune_vocab", "factorize_embeddings", {"finetune": {}}]}).recipes["r1"].steps
    assert [s.kind for s in steps] == ["prune_vocab", "factorize_embeddings", "finetune"]
    with pytest.raises(ParamsError, match="put prune_vocab after distill"):
        recipes({"r1": ["prune_vocab", {"quant_noise": {"method": "distill"}}]})
    recipes({"r1": ["prune_vocab", {"quant_noise": {"method": "finetune"}}]})  # own tokenizer: fine


def test_vocabulary_of_a_factorised_student_may_be_pruned_after_distillation():
    # factorize first, let distillation repair it, prune the vocabulary last (no label-only step needed)
    steps = recipes({"r1": ["factorize_embeddings", {"distill": {"transfer": True}}, "prune_vocab"]}).recipes["r1"].steps
    assert [s.kind for s in steps] == ["factorize_embeddings", "distill", "prune_vocab"] and steps[1].transfer


def test_default_params_include_the_standard_baseline_and_a_combined_recipe():
    from bertshrink.config.params import load_params

    params = load_params()
    assert params.compress.baseline == "baseline-ort-int8"
    assert [s.kind for s in params.compress.recipes["baseline-ort-int8"].steps] == ["export_onnx", "quantize"]
    assert params.compress.recipes["baseline-ort-int8"].steps[1].mode == "dynamic"
    assert [s.kind for s in params.compress.recipes["teacher-onnx"].steps] == ["export_onnx"]


# ------------------------------------------------------------------ one schema per knob

def _training_sections():
    from bertshrink.config.params import TeacherParams
    from bertshrink.config.recipes import FinetuneStep, QatStep, QuantNoiseStep

    return (TeacherParams, DistillStep, FinetuneStep, QatStep, QuantNoiseStep)


def test_every_training_section_declares_the_training_knobs_once():
    from bertshrink.config.knobs import KdLossKnobs, TrainingKnobs

    assert set(TrainingKnobs.model_fields) == {"epochs", "learning_rate", "batch_size", "eval_batch_size", "weight_decay",
                                               "warmup_ratio", "gradient_accumulation_steps", "logging_steps",
                                               "precision", "group_by_length"}
    for section in _training_sections():
        assert issubclass(section, TrainingKnobs), section
        for name, knob in TrainingKnobs.model_fields.items():
            field = section.model_fields[name]
            assert (field.annotation, field.metadata) == (knob.annotation, knob.metadata), (section, name)
    # the soft-target loss is shared by distill and the distilling quantization-aware steps
    from bertshrink.config.recipes import QatStep, QuantNoiseStep

    for section in (DistillStep, QatStep, QuantNoiseStep):
        assert issubclass(section, KdLossKnobs)
        assert (section().temperature, section().alpha_ce, section().alpha_kd) == (2.0, 0.5, 0.5)


@pytest.mark.parametrize("knob, value, message", [
    ("learning_rate", 2.0, "learning_rate\n  Input should be less than 1"),
    ("learning_rate", 0.0, "learning_rate\n  Input should be greater than 0"),
    ("epochs", 101, "epochs\n  Input should be less than or equal to 100"),
    ("batch_size", 0, "batch_size\n  Input should be greater than or equal to 1"),
    ("warmup_ratio", 1.0, "warmup_ratio\n  Input should be less than 1"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps\n  Input should be greater than or equal to 1"),
    ("precision", "int8", "precision\n  Input should be 'auto', 'fp32', 'fp16' or 'bf16'"),
])
def test_each_training_section_rejects_the_same_out_of_range_knob(knob, value, message):
    from pydantic import ValidationError

    for section in _training_sections():
        with pytest.raises(ValidationError, match=message):
            section(**{knob: value})


@pytest.mark.parametrize("where", [
    {"teacher": {"learning_rate": 2.0}},
    {"compress": {"recipes": {"r1": [{"distill": {"learning_rate": 2.0}}]}}},
    {"compress": {"recipes": {"r1": [{"finetune": {"learning_rate": 2.0}}]}}},
    {"compress": {"recipes": {"r1": [{"qat": {"learning_rate": 2.0}}]}}},
    {"compress": {"recipes": {"r1": [{"quant_noise": {"learning_rate": 2.0}}]}}},
])
def test_out_of_range_learning_rate_names_the_key_in_every_section(where):
    key = "teacher" if "teacher" in where else f"compress.recipes.r1[0].{next(iter(where['compress']['recipes']['r1'][0]))}"
    with pytest.raises(ParamsError, match=re.escape(f"{key}.learning_rate: Input should be less than 1 (got 2.0)")):
        parse_params(where)


def test_recovery_steps_train_shorter_than_the_teacher_and_distillation():
    from bertshrink.config.params import TeacherParams
    from bertshrink.config.recipes import FinetuneStep, QatStep, QuantNoiseStep

    for section in (FinetuneStep, QatStep, QuantNoiseStep):
        assert (section().epochs, section().learning_rate) == (1.0, 5e-5), section
    for section in (TeacherParams, DistillStep):
        assert (section().epochs, section().learning_rate) == (2.0, 1e-4), section
    # a section's own defaults fill only what is not given; the other knobs keep the shared defaults
    assert (FinetuneStep(epochs=3).epochs, FinetuneStep(epochs=3).learning_rate) == (3.0, 5e-5)
    assert (QatStep(learning_rate=1e-3).epochs, QatStep(learning_rate=1e-3).learning_rate) == (1.0, 1e-3)
    assert (FinetuneStep().batch_size, FinetuneStep().warmup_ratio, FinetuneStep().weight_decay) == (16, 0.1, 0.01)
    # and parsed from YAML the same way
    steps = recipes({"r1": [{"finetune": {}}, {"distill": {"student_layers": 2}}]}).recipes["r1"].steps
    assert [(s.epochs, s.learning_rate) for s in steps] == [(1.0, 5e-5), (2.0, 1e-4)]


def test_training_knobs_of_a_step_are_just_the_shared_knobs():
    from bertshrink.config.knobs import TrainingKnobs
    from bertshrink.config.recipes import QatStep

    knobs = QatStep(epochs=3, batch_size=4, temperature=4.0).training_knobs()
    assert type(knobs) is TrainingKnobs
    assert (knobs.epochs, knobs.learning_rate, knobs.batch_size) == (3.0, 5e-5, 4)
    as_distill = QatStep(epochs=3, temperature=4.0, alpha_ce=0.0, alpha_kd=1.0).as_distill_step()
    assert (as_distill.epochs, as_distill.learning_rate, as_distill.temperature) == (3.0, 5e-5, 4.0)
    assert as_distill.loss_weights() == {"ce": 0.0, "kd": 1.0, "hidden": 0.0, "attention": 0.0, "embedding": 0.0}


def test_distill_step_checks_at_construction():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="two_stage needs alpha_hidden, alpha_attention or alpha_embedding > 0"):
        DistillStep(two_stage=True)
    with pytest.raises(ValidationError, match="two_stage needs alpha_ce or alpha_kd > 0 for stage 2"):
        DistillStep(two_stage=True, alpha_hidden=1.0, alpha_ce=0.0, alpha_kd=0.0)
    with pytest.raises(ValidationError, match="give student_layers or teacher_layers, not both"):
        DistillStep(student_layers=3, teacher_layers=[0, 1, 2])
    with pytest.raises(ValidationError, match="layer_map must be a non-empty list of layer indices >= 0"):
        DistillStep(layer_map=[0, -1])
    staged = DistillStep(two_stage=True, alpha_hidden=1.0, teacher_layers=[0, 2])
    assert staged.loss_weights("intermediate") == {"ce": 0.0, "kd": 0.0, "hidden": 1.0, "attention": 0.0, "embedding": 0.0}
    assert staged.loss_weights("prediction") == {"ce": 0.5, "kd": 0.5, "hidden": 0.0, "attention": 0.0, "embedding": 0.0}
    assert staged.loss_weights() == {"ce": 0.5, "kd": 0.5, "hidden": 1.0, "attention": 0.0, "embedding": 0.0}
    # the same rules in params.yaml, with the recipe and step named
    with pytest.raises(ParamsError, match=re.escape("compress.recipes.r1[0].distill: Value error, two_stage needs")):
        recipes({"r1": [{"distill": {"two_stage": True}}]})
