"""Params: the shipped file parses; each kind of bad input fails naming the key and what's allowed."""

from pathlib import Path

import pytest
import yaml

from pydantic import ValidationError

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params, RegistryParams, load_params, parse_params
from bertshrink.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_parse_into_sections():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.model == "packaged:all-MiniLM-L6-v2"
    assert params.data.source == "packaged:bbc-news"
    assert params.validate_.min_class_share == 0.02
    assert params.evaluate.batch_sizes == (1, 32)
    assert Artifacts(params.base).teacher == Path("models/teacher")


def test_empty_file_gives_the_documented_defaults():
    params = parse_params({})
    assert params.base.seed == 42 and params.base.models_dir == Path("models")
    assert Artifacts(params.base).teacher == Path("models/teacher")
    assert (params.data.source, params.data.validation_size, params.data.test_size) == ("packaged:bbc-news", 0.15, 0.15)
    assert params.data.transfer_samples == 0 and params.data.split_names == {}
    teacher = params.teacher
    assert (teacher.model, teacher.max_length) == ("packaged:all-MiniLM-L6-v2", 128)
    assert (teacher.epochs, teacher.learning_rate, teacher.batch_size, teacher.eval_batch_size) == (2.0, 1e-4, 16, 64)
    assert (teacher.weight_decay, teacher.warmup_ratio, teacher.precision) == (0.01, 0.1, "auto")
    assert (teacher.save_steps, teacher.resume, teacher.layerdrop) == (50, True, 0.0)
    assert (params.validate_.min_train_rows, params.validate_.min_class_share) == (50, 0.02)
    assert (params.evaluate.threads, params.evaluate.batch_sizes, params.evaluate.seeds) == (2, (1, 32), 1)
    assert (params.registry.min_retention, params.registry.objective) == (0.98, "fastest")
    assert params.compress.recipes == {} and params.compress.baseline == "baseline-ort-int8"
    assert params.floor.c_values == (0.5, 2.0, 8.0, 32.0)


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"teacher": {"epoch": 3}})
    message = str(err.value)
    assert "teacher.epoch: unknown key" in message
    assert "epochs" in message and "learning_rate" in message


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match="trainer: unknown key; allowed keys: .*teacher"):
        parse_params({"trainer": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ParamsError) as err:
        parse_params({"teacher": {"batch_size": "sixteen"}})
    assert "teacher.batch_size" in str(err.value) and "'sixteen'" in str(err.value)


@pytest.mark.parametrize(
    "section, key, value, hint",
    [
        ("teacher", "learning_rate", -1.0, "greater than 0"),
        ("teacher", "epochs", 0, "greater than 0"),
        ("data", "test_size", 0.7, "less than 0.5"),
        ("validate", "min_class_share", 1.5, "less than 1"),
        ("evaluate", "threads", 0, "greater than or equal to 1"),
        ("base", "seed", -3, "greater than or equal to 0"),
    ],
)
def test_out_of_range_values_fail_with_the_bound(section, key, value, hint):
    with pytest.raises(ParamsError) as err:
        parse_params({section: {key: value}})
    assert f"{section}.{key}" in str(err.value) and hint in str(err.value)


def test_literal_lists_allowed_values():
    with pytest.raises(ParamsError) as err:
        parse_params({"teacher": {"precision": "int4"}})
    assert "teacher.precision" in str(err.value)
    assert "'auto', 'fp32', 'fp16' or 'bf16'" in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ParamsError, match="validation_size \\+ test_size"):
        parse_params({"data": {"validation_size": 0.45, "test_size": 0.45}})
    with pytest.raises(ParamsError, match="min_text_chars"):
        parse_params({"validate": {"min_text_chars": 10, "max_text_chars": 5}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="mapping of sections"):
        load_params(listy)


def test_sections_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="epochs\n  Instance is frozen"):
        params.teacher.epochs = 5
    assert params.teacher.epochs == 2.0


def test_flat_dict_for_logging():
    flat = Params().as_flat_dict()
    assert flat["teacher.max_length"] == 128 and flat["validate.min_train_rows"] == 50


def test_promotion_constraints_are_declared_once_and_composed_by_the_registry_section():
    from bertshrink.config.knobs import PromotionConstraints
    from bertshrink.selection.promotion import Constraints, constraints_of

    assert Constraints is PromotionConstraints and issubclass(RegistryParams, PromotionConstraints)
    # the rule alone has no limits; the registry section's defaults are the README's 98% / 95%
    assert Constraints().model_dump() == {"min_retention": None, "min_agreement": None,
                                          "max_p95_ms": None, "max_size_mb": None, "retention_bound": "point"}
    assert constraints_of(RegistryParams()) == Constraints(min_retention=0.98, min_agreement=0.95)
    with pytest.raises(ParamsError, match=r"registry.max_p95_ms: Input should be greater than 0"):
        parse_params({"registry": {"max_p95_ms": 0}})
    with pytest.raises(ParamsError, match=r"registry.retention_bound: Input should be 'point' or 'lower'"):
        parse_params({"registry": {"retention_bound": "upper"}})
