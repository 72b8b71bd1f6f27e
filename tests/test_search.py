"""The recipe search (issue 15): space -> recipes, the front, the persisted studies, and the flow.

The unit tests at the top run in seconds (no training); the flow tests at the bottom train tiny
trials through Prefect and MLflow and are marked slow/e2e.
"""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from bertshrink.config.knobs import PromotionConstraints
from bertshrink.config.params import parse_params
from bertshrink.config.search import SearchParams, SearchSpace
from bertshrink.errors import ParamsError
from bertshrink.modelfolder.families import Shape
from bertshrink.search.front import (Scored, constraint_margins, nondominated_ranks, pareto, promote_for_full,
                                     select_front)
from bertshrink.search.space import (SpaceContext, layers_kept, recipe_problems, recipe_steps, recipe_yaml,
                                     suggest)
from bertshrink.search.study import FULL, OWNER, PROXY, RETRY_OF, SearchStudy, owner_gone, study_key
from conftest import train_tiny_teacher

MINILM = SpaceContext(Shape(layers=6, heads=12, embedding_width=384, weight_layers=6))


# ---------------------------------------------------------------- the space


def sampled(space: SearchSpace, ctx: SpaceContext, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    values = []
    for _ in range(n):
        trial = study.ask()
        values.append(suggest(trial, space, ctx))
        study.tell(trial, 0.0)
    return values


def test_every_sampled_trial_is_a_recipe_the_params_loader_and_the_shape_check_accept():
    space = SearchSpace(layers=(1, 6), keep_fp32=((), ("SkipLayerNormalization", "BiasGelu")),
                        embedding_rank=(None, 64, 128, 512), calibration_rows=(64, 256),
                        quantize=("none", "dynamic", "static", "mixed"), precision_bits=(5.0, 8.0, 16.0))
    trials = sampled(space, MINILM, 150)
    for values in trials:
        steps = recipe_steps(values, MINILM)
        assert recipe_problems("searched-1", steps, MINILM) == [], (values, steps)
        # the YAML a user pastes under compress.recipes goes through the params loader unchanged
        pasted = yaml.safe_load(recipe_yaml("searched-1", steps))
        params = parse_params({"compress": {"recipes": pasted}})
        assert [s.kind for s in params.compress.recipes["searched-1"].steps] == [
            next(iter(s)) if isinstance(s, dict) else s for s in steps]
    kinds = {s if isinstance(s, str) else next(iter(s)) for v in trials for s in recipe_steps(v, MINILM)}
    # the space reaches every step it offers; a rank at or above the embedding width is never chosen
    assert kinds == {"drop_layers", "prune_heads", "prune_ffn", "factorize_embeddings", "distill", "prune_vocab",
                     "export_onnx", "quantize", "mixed_precision"}
    assert {v["embedding_rank"] for v in trials} == {None, 64, 128}


def test_a_trial_becomes_the_recipe_its_values_say():
    values = {"layer_choice": "spread", "layers": 2, "head_ratio": 0.5, "ffn_ratio": 0.0, "embedding_rank": 128,
              "alpha_hidden": 1.0, "alpha_attention": 0.0, "temperature": 2.0, "learning_rate": 1e-4,
              "epochs": 2.0, "transfer": False, "prune_vocab": True, "quantize": "static",
              "calibration_rows": 128, "keep_fp32": "SkipLayerNormalization"}
    assert recipe_steps(values, MINILM) == [
        {"drop_layers": {"strategy": "explicit", "layers": [0, 1, 3, 4]}},   # keeps 2 and 5, as tiny-int8 does
        {"prune_heads": {"ratio": 0.5}},
        {"factorize_embeddings": {"rank": 128}},
        {"distill": {"alpha_hidden": 1.0, "temperature": 2.0, "learning_rate": 1e-4, "epochs": 2.0}},
        "prune_vocab",
        "export_onnx",
        {"quantize": {"backend": "onnxruntime", "mode": "static",
                      "calibration": {"split": "train", "rows": 128, "method": "minmax"},
                      "keep_fp32": ["SkipLayerNormalization"]}},
    ]
    grouped = recipe_steps({**values, "group_by_length": True}, MINILM)[3]["distill"]
    assert grouped["group_by_length"] is True   # and False leaves the knob at its default (absent)
    assert "group_by_length" not in recipe_steps({**values, "group_by_length": False}, MINILM)[3]["distill"]
    # the proxy runs the same recipe with its own short distillation
    proxy = recipe_steps(values, MINILM, distill_epochs=0.5)
    assert proxy[3]["distill"]["epochs"] == 0.5 and proxy[:3] == recipe_steps(values, MINILM)[:3]
    # no quantization: a PyTorch model, no export
    plain = recipe_steps({**values, "quantize": "none", "layers": 6, "head_ratio": 0.0, "embedding_rank": None,
                          "prune_vocab": False}, MINILM)
    assert plain == [{"distill": {"alpha_hidden": 1.0, "temperature": 2.0, "learning_rate": 1e-4, "epochs": 2.0,
                                  "student_layers": 6}}]   # nothing shaped the student: cut from every layer


def test_per_layer_precision_is_a_dimension_of_the_mixed_choice():
    values = {"layer_choice": "spread", "layers": 3, "head_ratio": 0.0, "ffn_ratio": 0.0, "embedding_rank": None,
              "alpha_hidden": 0.0, "alpha_attention": 0.0, "temperature": 2.0, "learning_rate": 1e-4,
              "epochs": 1.0, "transfer": False, "prune_vocab": False, "quantize": "mixed", "precision_bits": 6.0}
    assert recipe_steps(values, MINILM)[-2:] == ["export_onnx", {"mixed_precision": {"bits": 6.0}}]
    for trial in sampled(SearchSpace(quantize=("none", "mixed")), MINILM, 30):
        assert ("precision_bits" in trial) == (trial["quantize"] == "mixed"), trial


def test_calibration_dimensions_are_only_chosen_for_static_int8():
    trials = sampled(SearchSpace(quantize=("none", "dynamic", "static")), MINILM, 60)
    for values in trials:
        assert ("calibration_rows" in values) == (values["quantize"] == "static"), values


@pytest.mark.parametrize("n_keep, how, expected", [
    (2, "spread", [2, 5]), (3, "spread", [1, 3, 5]), (1, "spread", [5]), (2, "bottom", [0, 1]),
    (2, "top", [4, 5]), (6, "spread", [0, 1, 2, 3, 4, 5]), (9, "top", [0, 1, 2, 3, 4, 5])])
def test_layers_kept(n_keep, how, expected):
    assert layers_kept(n_keep, how, 6) == expected


def test_search_params_are_range_checked():
    assert SearchParams().enabled is False   # make run must not get slower
    for bad, key in [({"space": {"head_ratio": [1.0]}}, "head_ratio"), ({"space": {"layers": [3, 1]}}, "layers"),
                     ({"budget_minutes": 0}, "budget_minutes"), ({"proxy": {"epoch": 1}}, "search.proxy.epoch"),
                     ({"space": {"calibration_rows": [8]}}, "calibration_rows"), ({"sampler": "grid"}, "sampler")]:
        with pytest.raises(ParamsError, match=key):
            parse_params({"search": bad})
    with pytest.raises(ParamsError, match="search-"):
        parse_params({"compress": {"recipes": {"search-1": ["prune_vocab"]}}})


# ---------------------------------------------------------------- the front


def s(number, accuracy, p50, size, **constraints) -> Scored:
    return Scored(number, accuracy, p50, size, constraints)


def test_constraint_margins_are_relative_and_only_for_set_limits():
    scores = {"retention": 0.97, "agreement": 0.99, "p95_ms": 12.0, "size_mb": 5.0}
    margins = constraint_margins(scores, PromotionConstraints(min_retention=0.98, max_p95_ms=10.0))
    assert margins == pytest.approx({"min_retention": (0.98 - 0.97) / 0.98, "max_p95_ms": 0.2})
    assert constraint_margins({}, PromotionConstraints(max_size_mb=1.0)) == {"max_size_mb": 1.0}  # not measured
    assert constraint_margins(scores, PromotionConstraints()) == {}
    lower = PromotionConstraints(min_retention=0.98, retention_bound="lower")
    assert constraint_margins({**scores, "retention_low": 0.95}, lower) == \
        pytest.approx({"min_retention": (0.98 - 0.95) / 0.98})


def test_pareto_front_and_ranks():
    items = [s(0, 0.90, 5.0, 10.0), s(1, 0.95, 8.0, 10.0), s(2, 0.89, 6.0, 11.0),   # 2 is dominated by 0
             s(3, 0.80, 2.0, 3.0), s(4, 0.80, 2.0, 3.0)]                            # 3 and 4 tie: neither dominates
    assert [x.number for x in pareto(items)] == [3, 4, 0, 1]
    assert nondominated_ranks(items) == [0, 0, 1, 0, 0]


def test_front_keeps_only_trials_that_meet_the_constraints():
    items = [s(0, 0.99, 9.0, 10.0, min_retention=-0.01), s(1, 0.97, 3.0, 2.0, min_retention=0.01),
             s(2, 0.98, 5.0, 5.0, min_retention=0.0)]
    front = select_front(items, max_size=4)
    assert front.constraints_met and [m.number for m in front.members] == [2, 0]


def test_nothing_meets_the_constraints_gives_the_least_violating_flagged_not_an_empty_front():
    items = [s(0, 0.50, 1.0, 1.0, min_retention=0.40), s(1, 0.60, 2.0, 2.0, min_retention=0.30),
             s(2, 0.70, 3.0, 3.0, min_retention=0.20), s(3, 0.40, 1.0, 1.0, min_retention=0.50)]
    front = select_front(items, max_size=2)
    assert front.constraints_met is False and [m.number for m in front.members] == [2, 1]
    assert "no trial of 4 met the constraints" in front.reason
    assert select_front([], 3).members == ()


def test_front_size_is_capped_keeping_both_ends():
    items = [s(i, 0.80 + 0.01 * i, 1.0 + i, 1.0 + i) for i in range(7)]   # every one non-dominated
    members = select_front(items, max_size=3).members
    assert [m.number for m in members] == [0, 3, 6]


def test_successive_halving_keeps_the_top_third_feasible_first():
    items = [s(0, 0.99, 9.0, 9.0, min_retention=0.1), s(1, 0.90, 5.0, 5.0), s(2, 0.85, 6.0, 6.0),
             s(3, 0.80, 1.0, 1.0), s(4, 0.70, 7.0, 7.0), s(5, 0.60, 8.0, 8.0, min_retention=0.2)]
    assert [x.number for x in promote_for_full(items, eta=3, max_full=10)] == [3, 1]
    assert [x.number for x in promote_for_full(items, eta=1, max_full=10)] == [3, 1, 2, 4, 0, 5]
    assert [x.number for x in promote_for_full(items, eta=3, max_full=1)] == [1]   # one of rank 0: most accurate
    assert [x.number for x in promote_for_full(items[:1], eta=3, max_full=4)] == [0]  # never none


# ---------------------------------------------------------------- the persisted study


def fake_scores(values: dict) -> dict:
    """Scores that depend on the trial's values only (no training): fast, and deterministic."""
    layers = values["layers"]
    return {"accuracy": 0.5 + 0.1 * layers, "p50_ms": 1.0 * layers, "p95_ms": 1.2 * layers, "size_mb": 2.0 * layers,
            "retention": 0.9 + 0.02 * layers, "agreement": 0.9}


def open_study(tmp_path, constraints=PromotionConstraints(min_retention=0.95)):
    return SearchStudy(f"sqlite:///{tmp_path / 'study.db'}", "unit", "nsga2", 0, constraints)


SMALL = SearchSpace(layers=(1, 6), head_ratio=(0.0,), ffn_ratio=(0.0,), embedding_rank=(None,),
                    prune_vocab=(False,), alpha_hidden=(0.0,), epochs=(1.0,), quantize=("none",))


def run_proxy_trial(study: SearchStudy):
    spec = study.ask(PROXY, lambda trial: suggest(trial, SMALL, MINILM))
    study.tell(spec, fake_scores(spec.values))
    return spec


def test_a_killed_trial_is_failed_and_its_params_enqueued_again(tmp_path):
    study = open_study(tmp_path)
    done = [run_proxy_trial(study) for _ in range(2)]
    # a process asks for a trial and is killed mid-training: its trial stays RUNNING
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{__import__('socket').gethostname()}:{killed.stdout.strip()}:1"
    assert owner_gone(dead_owner)
    orphan = study.ask(PROXY, lambda trial: suggest(trial, SMALL, MINILM))
    study.studies[PROXY]._storage.set_trial_user_attr(study.trial(PROXY, orphan.number)._trial_id, OWNER, dead_owner)

    resumed = open_study(tmp_path)   # a new run, as after the kill
    assert resumed.recover() == [f"unit-proxy #{orphan.number}"]
    assert resumed.trial(PROXY, orphan.number).state == TrialState.FAIL
    retry = resumed.ask(PROXY, lambda trial: suggest(trial, SMALL, MINILM))
    assert retry.values == orphan.values and retry.user_attrs[RETRY_OF] == orphan.number
    resumed.tell(retry, fake_scores(retry.values))
    finished = resumed.trials(PROXY)
    assert [t.number for t in finished] == [done[0].number, done[1].number, retry.number]   # none repeated
    # a live owner's RUNNING trial (this process) is left alone
    resumed.ask(PROXY, lambda trial: suggest(trial, SMALL, MINILM))
    assert open_study(tmp_path).recover() == []


def test_proxy_winners_go_to_the_full_study_once(tmp_path):
    study = open_study(tmp_path)
    specs = [run_proxy_trial(study) for _ in range(5)]
    winners = [x.number for x in promote_for_full(study.scored(PROXY), eta=2, max_full=2)]
    assert study.enqueue_full(winners) == winners and study.waiting(FULL) == len(winners)
    assert study.enqueue_full(winners) == []   # a rerun does not enqueue them twice
    spec = study.ask(FULL, lambda trial: suggest(trial, SMALL, MINILM))
    assert spec.values == next(x.values for x in specs if x.number == spec.user_attrs["proxy_trial"])


def test_study_key_follows_what_scores_depend_on():
    base = dict(constraints=PromotionConstraints(min_retention=0.98), teacher_fingerprint="t", data_hash="d", seed=1)
    key = study_key(SearchParams(), **base)
    assert key == study_key(SearchParams(budget_minutes=5, max_trials=3), **base)   # budget: same study, resumable
    assert key != study_key(SearchParams(space=SearchSpace(head_ratio=(0.0,))), **base)
    assert key != study_key(SearchParams(), **{**base, "teacher_fingerprint": "other"})
    assert key != study_key(SearchParams(), **{**base, "constraints": PromotionConstraints()})


# ---------------------------------------------------------------- the flow, on a tiny trained teacher

TINY_SPACE = {"layers": [1, 2], "layer_choice": ["spread", "bottom"], "head_ratio": [0.0, 0.5],
              "ffn_ratio": [0.0, 0.5], "embedding_rank": [None, 16], "prune_vocab": [False, True],
              "alpha_hidden": [0.0, 1.0], "epochs": [3], "learning_rate": [3.0e-3], "quantize": ["none", "dynamic"]}


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, tiny_bert, prepared):
    return train_tiny_teacher(tiny_bert, prepared, tmp_path_factory.mktemp("search-teacher")).model_dir


@pytest.fixture
def workspace(tmp_path, monkeypatch, prepared, trained_teacher):
    """A workspace after the teacher stages: prepared data, the teacher, its metrics (a throwaway MLflow store)."""
    import shutil

    from bertshrink.data.prepare import write_prepared

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_prepared(prepared, tmp_path / "data/prepared")
    shutil.copytree(trained_teacher, tmp_path / "models/teacher")
    return tmp_path


def search_params(registry: dict | None = None, **search):
    raw = {"evaluate": {"threads": 1, "warmup_iterations": 1, "timed_iterations": 3, "max_length": 32,
                        "batch_sizes": [1, 8]},
           "registry": {"experiment": "search", "model_name": "tiny-search", "min_retention": 0.5,
                        "min_agreement": 0.5, **(registry or {})},
           "search": {"budget_minutes": 30, "max_trials": 2, "eta": 1, "max_full_trials": 2, "max_front_size": 2,
                      "latency_iterations": 3, "proxy": {"train_rows": 30, "epochs": 1}, "space": TINY_SPACE,
                      **search}}
    return parse_params(raw)


def trial_runs(client, experiment: str) -> list[str]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    return sorted(r.info.run_name for r in runs if r.info.run_name.startswith("search:"))


@pytest.mark.slow
@pytest.mark.e2e
def test_search_registers_its_front_and_a_killed_study_resumes_without_repeating_trials(workspace, prefect_server):
    from mlflow.tracking import MlflowClient

    from bertshrink.config.artifacts import Artifacts
    from flows.evaluate import evaluate_flow
    from flows.search import search_flow

    params = search_params()
    evaluate_flow(params)   # the teacher's metrics and predictions: retention and agreement of the members
    out = search_flow(params)
    front = json.loads((workspace / "reports/search/front.json").read_text())
    assert front == out["front"] and front["trials"] == {"proxy": 2, "full": 2} and front["constraints_met"]
    names = [m["name"] for m in front["members"]]
    assert names and names == [f"search-{k}" for k in range(1, len(names) + 1)] and len(names) <= 2
    client = MlflowClient()
    for member in front["members"]:
        # evaluated and registered like a recipe: metrics file, alias, version tag of the front's status
        assert json.loads((workspace / f"metrics/{member['name']}.json").read_text())["model"] == member["name"]
        version = client.get_model_version_by_alias("tiny-search", member["name"])
        assert str(version.version) == member["registered_version"]
        assert version.tags["search.constraints_met"] == "true" and version.tags["recipe"] == member["name"]
        # the recipe: what a user pastes under compress.recipes, accepted by the params loader
        pasted = parse_params({"compress": {"recipes": yaml.safe_load(member["recipe_yaml"])}})
        assert len(pasted.compress.recipes) == 1
        assert member["full"]["accuracy"] >= 0 and member["proxy"]["accuracy"] >= 0
        # validation figures only: the members' scores come from the validation split's size
        assert member["full"]["constraints_met"] is True
    assert Artifacts(params.base).search_members() == names
    # every trial is a run nested under the search's run, with its recipe as an artifact
    assert trial_runs(client, "search") == ["search:full-0", "search:full-1", "search:proxy-0", "search:proxy-1"]
    search_run = client.search_runs([client.get_experiment_by_name("search").experiment_id],
                                    filter_string="attributes.run_name = 'search'")[0]
    proxy_run = client.search_runs([search_run.info.experiment_id],
                                   filter_string="attributes.run_name = 'search:proxy-0'")[0]
    assert proxy_run.data.tags["mlflow.parentRunId"] == search_run.info.run_id
    assert "proxy.accuracy" in proxy_run.data.metrics and proxy_run.data.tags["search.constraints_met"] in ("true", "false")
    assert [a.path for a in client.list_artifacts(proxy_run.info.run_id)] == [
        f"{front['studies']['proxy']}-0.yaml"]

    # a run is killed mid-trial: its trial stays RUNNING in the study
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study = SearchStudy(Artifacts(params.base).search_storage(None), front["studies"]["proxy"].removesuffix("-proxy"),
                        "nsga2", 0, params.registry.constraints())
    orphan = study.ask(PROXY, lambda trial: suggest(trial, params.search.space, MINILM_TINY))
    study.studies[PROXY]._storage.set_trial_user_attr(study.trial(PROXY, orphan.number)._trial_id, OWNER,
                                                      f"{__import__('socket').gethostname()}:{killed.stdout.strip()}:1")
    again = search_flow(search_params(max_trials=3, eta=1, max_full_trials=3))
    # the finished trials were not run again: only the killed trial's retry and the new full trial
    assert again["front"]["recovered"] == [f"{front['studies']['proxy']} #2"]
    assert trial_runs(client, "search") == ["search:full-0", "search:full-1", "search:full-2", "search:proxy-0",
                                            "search:proxy-1", "search:proxy-3"]
    retry = study.trial(PROXY, 3)
    assert retry.params == orphan.values and retry.user_attrs[RETRY_OF] == 2
    assert again["front"]["trials"] == {"proxy": 3, "full": 3}


MINILM_TINY = SpaceContext(Shape(layers=2, heads=2, embedding_width=32, weight_layers=2))


@pytest.mark.slow
@pytest.mark.e2e
def test_constraints_nothing_meets_give_a_flagged_front_not_an_error(workspace, prefect_server):
    from mlflow.tracking import MlflowClient

    from flows.search import search_flow

    params = search_params(max_trials=2, max_full_trials=1, registry={"min_retention": 2.0, "max_size_mb": 1e-6})
    out = search_flow(params)
    front = out["front"]
    assert front["constraints_met"] is False and "no trial of 1 met the constraints" in front["reason"]
    assert [m["name"] for m in front["members"]] == ["search-1"] and front["members"][0]["constraints_met"] is False
    version = MlflowClient().get_model_version_by_alias("tiny-search", "search-1")
    assert version.tags["search.constraints_met"] == "false"
