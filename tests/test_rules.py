"""Rules on measured candidates: a collapsed candidate is named, with the numbers."""

import math

import pytest

from bertshrink.selection.rules import collapse_reason, reported_accuracy, selection_accuracy


def result(accuracy, test=None):
    """An evaluation result: validation accuracy ``accuracy``, test accuracy ``test`` (default the same)."""
    return {"metrics": {"validation": {"accuracy": accuracy}, "test": {"accuracy": accuracy if test is None else test}}}


def test_collapse_is_a_drop_beyond_the_allowed_one():
    assert collapse_reason(result(0.90), result(0.97), max_drop=0.10) is None
    reason = collapse_reason(result(0.33), result(0.97), max_drop=0.10)
    assert reason and "0.3300" in reason and "0.6400 below the teacher's 0.9700" in reason
    assert "compress.max_accuracy_drop = 0.1" in reason
    assert collapse_reason(result(0.86), result(0.97), max_drop=0.10) is not None  # 0.11 > 0.10


def test_collapse_is_judged_on_validation_not_on_test():
    # fine on validation, collapsed on test: registered (the test split only reports) ...
    assert collapse_reason(result(0.95, test=0.40), result(0.97, test=0.97), max_drop=0.10) is None
    # ... and the other way round: not registered, naming the validation split
    reason = collapse_reason(result(0.40, test=0.95), result(0.97, test=0.97), max_drop=0.10)
    assert reason.startswith("validation accuracy 0.4000 is 0.5700 below")


def test_unscored_or_missing_accuracy():
    assert collapse_reason(result(math.nan), result(0.97), 0.1) == "validation accuracy is NaN"
    assert collapse_reason({}, result(0.97), 0.1) is None
    assert reported_accuracy({"metrics": {}}) is None and reported_accuracy(result(0.5, test=0.4)) == 0.4
    assert selection_accuracy(result(0.5, test=0.4)) == 0.5


def test_register_stage_keeps_a_collapsed_candidate_unregistered(tmp_path, monkeypatch):
    import json

    from bertshrink.config.artifacts import Artifacts
    from bertshrink.config.params import parse_params
    from flows.register import collapsed, keep_unregistered

    monkeypatch.chdir(tmp_path)
    params = parse_params({"compress": {"max_accuracy_drop": 0.05}})
    paths = Artifacts(params.base)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "teacher.json").write_text(json.dumps(result(0.95)))
    (metrics / "ok.json").write_text(json.dumps(result(0.93)))
    (metrics / "broken-int8.json").write_text(json.dumps(result(0.40)))
    assert collapsed(params, paths.teacher) is None
    assert collapsed(params, paths.candidate("ok")) is None
    reason = collapsed(params, paths.candidate("broken-int8"))
    assert reason and "0.5500 below" in reason

    record = keep_unregistered(params, paths.candidate("broken-int8"), reason)
    saved = json.loads((tmp_path / "reports/registry/broken-int8.json").read_text())
    assert saved == record and saved["registered"] is False and saved["collapsed"] is True
    assert saved["alias"] == "broken-int8" and saved["model_dir"] == "models/candidates/broken-int8"


def test_stale_reason_known_cases():
    from bertshrink.selection.rules import stale_reason

    result = {"model_fingerprint": "a" * 64, "data_content_hash": "d" * 64}
    assert stale_reason(result, "a" * 64, "d" * 64) is None
    assert stale_reason(result, "b" * 64, "d" * 64) == (f"it measured model {'a' * 12}, but the folder now holds "
                                                       f"model {'b' * 12}")
    assert stale_reason(result, "a" * 64, "e" * 64) == (f"it was measured on data {'d' * 12}, but the model was "
                                                       f"trained on data {'e' * 12}")
    assert "no model fingerprint" in stale_reason({"data_content_hash": "d" * 64}, "a" * 64, "d" * 64)


def test_register_refuses_metrics_of_another_model_and_says_evaluate_first(tmp_path):
    """Issue 13, row 2: a retrained teacher registered without evaluating it again."""
    import json

    from bertshrink.config.params import RegistryParams
    from bertshrink.errors import MissingArtifactError
    from bertshrink.modelfolder.size import content_fingerprint
    from conftest import build_tiny_bert
    from tasks.registry import register_model

    old = build_tiny_bert(tmp_path / "old", num_labels=2, meta={"kind": "teacher", "data_content_hash": "d1"})
    new = build_tiny_bert(tmp_path / "teacher", num_labels=2, seed=1, meta={"kind": "teacher", "data_content_hash": "d1"})
    assert content_fingerprint(old) != content_fingerprint(new)
    assert content_fingerprint(new) == content_fingerprint(new)
    metrics = tmp_path / "teacher.json"
    metrics.write_text(json.dumps({"model_fingerprint": content_fingerprint(old), "data_content_hash": "d1",
                                   "metrics": {"test": {"accuracy": 0.9}}}))
    record = tmp_path / "registry" / "teacher.json"
    with pytest.raises(MissingArtifactError, match=r"does not belong to the model in .*teacher: it measured model "
                                                   r".*Evaluate first \(`python -m flows.evaluate --model-dir"):
        register_model.fn(str(new), str(metrics), RegistryParams(), "teacher", "no-run", str(record))
    metrics.write_text(json.dumps({"model_fingerprint": content_fingerprint(new), "data_content_hash": "d0"}))
    with pytest.raises(MissingArtifactError, match=r"measured on data d0, but the model was trained on data d1"):
        register_model.fn(str(new), str(metrics), RegistryParams(), "teacher", "no-run", str(record))
    assert not record.exists()  # nothing registered, nothing recorded


def test_promotion_skips_a_model_whose_metrics_measured_another_registered_model(tmp_path):
    import json

    from bertshrink.config.artifacts import Artifacts
    from bertshrink.config.params import BaseParams
    from bertshrink.config.params import RegistryParams
    from bertshrink.selection.promotion import STALE, constraints_of, ineligibility
    from tasks.promote import gather_candidates

    paths = Artifacts(BaseParams(metrics_dir=tmp_path / "metrics", reports_dir=tmp_path / "reports"))
    for name, registered_as in (("teacher", "f1"), ("small", "f0")):
        paths.metrics(name).parent.mkdir(parents=True, exist_ok=True)
        paths.metrics(name).write_text(json.dumps({"model_fingerprint": "f1", "metrics": {"test": {"accuracy": 0.9}},
                                                   "selection": {"retention": 1.0, "agreement": 1.0}}))
        paths.registry_record(name).parent.mkdir(parents=True, exist_ok=True)
        paths.registry_record(name).write_text(json.dumps({"version": "1", "model_fingerprint": registered_as}))
    teacher, small = gather_candidates(paths, ["teacher", "small"])
    assert teacher.status == "ok" and small.status == STALE
    assert ineligibility(small, constraints_of(RegistryParams())) == f"status {STALE}"
