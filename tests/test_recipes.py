"""Compression recipes parse into typed steps; bad recipes fail at params time, naming recipe and step."""

import pytest

from bertshrink.errors import ParamsError
from bertshrink.params import parse_params
from bertshrink.recipes import (DistillStep, DropLayersStep, PruneFfnStep, PruneHeadsStep, PruneVocabStep,
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
    ({"r1": [{"prune_heads": {"ratio": 1.0}}]}, "compress.recipes.r1.steps.0.prune_heads.ratio"),
    ({"r1": [{"prune_heads": {}}]}, "give exactly one of ratio"),
    ({"r1": [{"distill": {"tempreature": 3}}]}, "compress.recipes.r1.steps.0.distill.tempreature: unknown key"),
    ({"r1": [{"distill": {"alpha_ce": 0, "alpha_kd": 0}}]}, "at least one of alpha_ce"),
    ({"r1": [{"drop_layers": {"strategy": "explicit"}}]}, "needs a non-empty `layers` list"),
    ({"r1": [{"magnitude": {"sparsity": 1.0}}]}, "compress.recipes.r1.steps.0.magnitude.sparsity"),
    ({"r1": []}, "compress.recipes.r1.steps"),
    ({"bad name": ["prune_vocab"]}, "recipe name 'bad name'"),
    ({"teacher": ["prune_vocab"]}, "cannot be named 'teacher'"),
    ({"champion": ["prune_vocab"]}, "recipe name 'champion' is reserved"),
    ({"v2": ["prune_vocab"]}, "recipe name 'v2' is reserved"),
    ({"r1": ["prune_vocab", {"distill": {}}]}, "put prune_vocab after distill/finetune"),
    ({"r1": ["factorize_embeddings", "prune_vocab"]}, "put prune_vocab before factorize_embeddings"),
    ({"r1": ["factorize_embeddings", "factorize_embeddings"]}, "factorised once"),
    ({"r1": [{"factorize_embeddings": {"rank": 0}}]}, "compress.recipes.r1.steps.0.factorize_embeddings.rank"),
])
def test_bad_recipes_fail_naming_recipe_and_step(raw, fragment):
    with pytest.raises(ParamsError) as err:
        recipes(raw)
    assert fragment in str(err.value)


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
    assert "compress.recipes.full-rank[0].factorize_embeddings: rank 384 >= hidden size 384 saves nothing" in text
    assert not [p for p in problems if "recipes.fine" in p or "recipes.low-rank" in p]
