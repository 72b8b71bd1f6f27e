"""Scale-out pieces that need no server: the ``scale_out`` knobs, recipe fingerprints, the refusal of
a local tracking store, and model bundles through a real (local) MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.params import BaseParams, parse_params
from bertshrink.config.recipes import Recipe, recipe_fingerprint
from bertshrink.errors import ParamsError, ScaleOutError
from bertshrink.modelfolder.size import content_fingerprint
from conftest import build_tiny_bert
from flows.fan_out import recipe_deployment
from flows.recipe import check_same_recipe
from tracking.runs import require_shared_tracking
from tracking.transfer import bundle_files, done_recipe_version, fetch_bundle, log_bundle


def test_scale_out_knobs_are_checked():
    with pytest.raises(ParamsError, match="scale_out.concurrency"):
        parse_params({"scale_out": {"concurrency": 0}})
    with pytest.raises(ParamsError, match="scale_out.recipe_deployment"):
        parse_params({"scale_out": {"recipe_deployment": "no-slash"}})
    assert parse_params({}).scale_out.mode == "auto"


def test_a_recipe_fingerprint_follows_its_knobs():
    one = Recipe.model_validate([{"distill": {"student_layers": 2, "epochs": 1}}])
    same = Recipe.model_validate([{"distill": {"epochs": 1, "student_layers": 2}}])
    other = Recipe.model_validate([{"distill": {"student_layers": 2, "epochs": 2}}])
    assert recipe_fingerprint(one) == recipe_fingerprint(same) != recipe_fingerprint(other)


def test_a_worker_refuses_a_recipe_that_differs_from_the_submitted_one():
    params = parse_params({"compress": {"recipes": {"d": [{"distill": {"student_layers": 2}}]}}})
    check_same_recipe(params, "d", recipe_fingerprint(params.compress.recipes["d"]))
    with pytest.raises(ParamsError, match="differs from the one the pipeline submitted"):
        check_same_recipe(params, "d", "0123456789abcdef")
    with pytest.raises(ParamsError, match="unknown recipe"):
        check_same_recipe(params, "nope", None)


def test_scale_out_refuses_a_tracking_store_only_this_machine_sees(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(ScaleOutError, match="MLFLOW_TRACKING_URI is sqlite"):
        require_shared_tracking("a test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    require_shared_tracking("a test")


def test_without_a_prefect_server_recipes_stay_local_unless_the_params_insist(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert recipe_deployment(parse_params({})) is None
        assert recipe_deployment(parse_params({"scale_out": {"mode": "local"}})) is None
        with pytest.raises(ScaleOutError, match="PREFECT_API_URL is not set"):
            recipe_deployment(parse_params({"scale_out": {"mode": "deployment"}}))


@pytest.fixture
def local_tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = MlflowClient().create_experiment("bundles", artifact_location=(tmp_path / "mlruns").as_uri())
    return experiment


def paths_under(root) -> Artifacts:
    return Artifacts(BaseParams(prepared_dir=str(root / "data/prepared"), models_dir=str(root / "models"),
                                metrics_dir=str(root / "metrics"), reports_dir=str(root / "reports"),
                                checkpoints_dir=str(root / "checkpoints")))


def test_a_teacher_bundle_travels_through_mlflow_byte_for_byte(tmp_path, local_tracking):
    here, there = paths_under(tmp_path / "here"), paths_under(tmp_path / "there")
    build_tiny_bert(here.teacher, num_labels=2, meta={"kind": "teacher"})
    here.metrics(TEACHER).parent.mkdir(parents=True)
    here.metrics(TEACHER).write_text(json.dumps({"metrics": {"test": {"accuracy": 0.75}}}))
    here.predictions(TEACHER).parent.mkdir(parents=True)
    here.predictions(TEACHER).write_text(json.dumps({"test": [0, 1, 1]}))
    here.prepared.mkdir(parents=True)
    (here.prepared / "meta.json").write_text(json.dumps({"content_hash": "abc"}))

    client = MlflowClient()
    run = client.create_run(local_tracking)
    log_bundle(run.info.run_id, bundle_files(here, TEACHER, here.teacher))
    client.create_registered_model("m")
    version = client.create_model_version("m", source="unused", run_id=run.info.run_id)
    print_ = content_fingerprint(here.teacher)
    client.set_model_version_tag("m", version.version, "model_fingerprint", print_)
    version = client.get_model_version("m", version.version)

    assert fetch_bundle(version, bundle_files(there, TEACHER, there.teacher)) is True
    assert content_fingerprint(there.teacher) == print_
    assert json.loads(there.metrics(TEACHER).read_text())["metrics"]["test"]["accuracy"] == 0.75
    assert json.loads(there.predictions(TEACHER).read_text()) == {"test": [0, 1, 1]}
    assert json.loads((there.prepared / "meta.json").read_text()) == {"content_hash": "abc"}
    # the same model already in place: nothing is fetched again
    assert fetch_bundle(version, bundle_files(there, TEACHER, there.teacher)) is False


def test_a_done_recipe_is_found_by_teacher_and_recipe_fingerprints(local_tracking):
    client = MlflowClient()
    client.create_registered_model("m")
    for recipe, teacher, fingerprint in (("a", "t1", "r1"), ("a", "t2", "r1"), ("a", "t1", "r2"), ("b", "t1", "r1")):
        version = client.create_model_version("m", source="unused")
        for key, value in {"recipe": recipe, "teacher_model_fingerprint": teacher, "recipe_fingerprint": fingerprint}.items():
            client.set_model_version_tag("m", version.version, key, value)
    assert str(done_recipe_version("m", "a", "t1", "r1").version) == "1"
    assert str(done_recipe_version("m", "a", "t1", "r2").version) == "3"
    assert done_recipe_version("m", "a", "t3", "r1") is None
