"""Rules on measured candidates: a collapsed candidate is named, with the numbers."""

import math

from bertshrink.selection.rules import collapse_reason, reported_accuracy


def result(accuracy):
    return {"metrics": {"test": {"accuracy": accuracy}}}


def test_collapse_is_a_drop_beyond_the_allowed_one():
    assert collapse_reason(result(0.90), result(0.97), max_drop=0.10) is None
    reason = collapse_reason(result(0.33), result(0.97), max_drop=0.10)
    assert reason and "0.3300" in reason and "0.6400 below the teacher's 0.9700" in reason
    assert "compress.max_accuracy_drop = 0.1" in reason
    assert collapse_reason(result(0.86), result(0.97), max_drop=0.10) is not None  # 0.11 > 0.10


def test_unscored_or_missing_accuracy():
    assert collapse_reason(result(math.nan), result(0.97), 0.1) == "test accuracy is NaN"
    assert collapse_reason({}, result(0.97), 0.1) is None
    assert reported_accuracy({"metrics": {}}) is None and reported_accuracy(result(0.5)) == 0.5


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
