"""benchmarks/fan_out_scaling.py's own logic, on known values: which recipes and params each round runs
with, how the wall time is read from the flow runs, and the table. The whole benchmark (servers,
workers, the teacher) is run end to end by hand: `python benchmarks/fan_out_scaling.py --params configs/tiny.yaml`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fan_out_round  # noqa: E402
import fan_out_scaling  # noqa: E402

from bertshrink.config.params import parse_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_a_recipe_subset_keeps_only_those_recipes_and_drops_a_baseline_left_out():
    raw = fan_out_scaling.selected(DEFAULTS, ["vocab", "distill-2l"])
    assert list(raw["compress"]["recipes"]) == ["distill-2l", "vocab"]   # the params file's order
    assert raw["compress"]["baseline"] is None
    assert raw["search"]["enabled"] is False
    assert fan_out_scaling.selected(DEFAULTS, None)["compress"]["baseline"] == "baseline-ort-int8"
    assert len(fan_out_scaling.selected(DEFAULTS, None)["compress"]["recipes"]) == 9


def test_an_unknown_recipe_is_named():
    with pytest.raises(SystemExit, match="no-such-recipe"):
        fan_out_scaling.selected(DEFAULTS, ["vocab", "no-such-recipe"])


@pytest.mark.parametrize("workers, threads", [(1, 2), (2, 1)])
def test_each_round_has_a_model_of_its_own_insists_on_the_pool_and_splits_the_threads(workers, threads):
    raw = fan_out_scaling.round_params(fan_out_scaling.selected(DEFAULTS, None), workers, threads)
    params = parse_params(raw, source="round")           # still valid params
    assert params.registry.model_name == f"bertshrink-classifier-scaling-n{workers}"
    assert params.scale_out.mode == "deployment"
    assert params.evaluate.threads == threads
    assert params.scale_out.concurrency >= workers
    assert fan_out_scaling.thread_env(threads) == {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def test_wall_runs_from_the_first_submission_to_the_last_end():
    runs = [{"submitted": "2026-12-02T10:00:00+00:00", "ended": "2026-12-02T10:05:00+00:00"},
            {"submitted": "2026-12-02T10:00:02+00:00", "ended": "2026-12-02T10:09:30+00:00"}]
    assert fan_out_round.first_submission_to_last_end(runs) == 570.0
    assert fan_out_round.first_submission_to_last_end([*runs, {"submitted": "2026-12-02T10:00:03+00:00",
                                                                "ended": None}]) is None   # one never ended
    assert fan_out_round.first_submission_to_last_end([]) is None


def test_the_table_shows_each_round_its_speed_up_and_each_recipe():
    def run(recipe, seconds, worker):
        return {"recipe": recipe, "run_seconds": seconds, "worker": worker}

    result = {"params": "params.yaml", "recipes": ["a", "b"], "teacher_stages_seconds": {"teacher": 300.0},
              "machine": {"cpu_model": "Some CPU", "cores": 2, "git_commit": "abc1234", "date": "2026-12-02"},
              "rounds": [{"workers": 1, "threads_per_worker": 2, "wall_seconds": 600.0, "failed": {},
                          "runs": [run("a", 240.0, "n1-w1"), run("b", 300.0, "n1-w1")]},
                         {"workers": 2, "threads_per_worker": 1, "wall_seconds": 480.0, "failed": {"b": "crashed"},
                          "runs": [run("a", 360.0, "n2-w1"), run("b", 420.0, "n2-w2")]}]}
    lines = fan_out_scaling.markdown(result).splitlines()
    assert "| 1 | 2 | 10.0 | 1.00x | 9.0 | none |" in lines
    assert "| 2 | 1 | 8.0 | 1.25x | 13.0 | b |" in lines
    assert "| b | 5.0 (n1-w1) | 7.0 (n2-w2) |" in lines
