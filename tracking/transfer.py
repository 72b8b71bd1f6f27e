"""Model folders travel through MLflow: what a worker on another machine needs, and what it made.

Every registered version's run carries a ``bertshrink/`` artifact folder, its *bundle*: the model
folder itself (our format, whatever flavour serves it), its metrics and predictions, and for the
teacher the prepared data too. A worker on a fresh checkout fetches the teacher's bundle to run a
recipe; the machine that submitted the recipes fetches each candidate's bundle to time, promote and
report it. No shared disk is needed: the tracking server proxies the artifacts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.errors import MissingArtifactError
from bertshrink.modelfolder.files import swapped_in
from bertshrink.modelfolder.size import content_fingerprint
from tracking.runs import log_artifact

BUNDLE = "bertshrink"
MODEL, PREPARED, METRICS, PREDICTIONS = "model", "prepared", "metrics.json", "predictions.json"


@dataclass(frozen=True)
class BundleFiles:
    """Where one model's bundle lives on this machine."""

    model_dir: Path
    metrics: Path
    predictions: Path
    prepared: Path | None = None   # the teacher's only


def bundle_files(paths: Artifacts, name: str, model_dir: Path) -> BundleFiles:
    """The local files of model ``name`` that its bundle carries."""
    return BundleFiles(Path(model_dir), paths.metrics(name), paths.predictions(name),
                       paths.prepared if name == TEACHER else None)


def log_bundle(run_id: str, files: BundleFiles) -> None:
    """Log the bundle under the registration run ``run_id``: the model folder, the prepared data
    (teacher), and the metrics and predictions under fixed names."""
    log_artifact(run_id, files.model_dir, f"{BUNDLE}/{MODEL}")
    if files.prepared is not None:
        log_artifact(run_id, files.prepared, f"{BUNDLE}/{PREPARED}")
    with tempfile.TemporaryDirectory(prefix="bertshrink-bundle-") as tmp:
        for source, name in ((files.metrics, METRICS), (files.predictions, PREDICTIONS)):
            if source.is_file():
                shutil.copyfile(source, Path(tmp) / name)
        log_artifact(run_id, Path(tmp), BUNDLE)


def fetch_bundle(version: ModelVersion, files: BundleFiles) -> bool:
    """Put version's bundle in place of ``files``; False (nothing fetched) where the local model folder
    already holds that very model (same content fingerprint) and its metrics are there.

    Each folder is swapped in whole, so an interrupted fetch leaves the previous one intact.
    """
    wanted = version.tags.get("model_fingerprint")
    if _holds(files, wanted):
        return False
    with tempfile.TemporaryDirectory(prefix="bertshrink-bundle-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=BUNDLE, dst_path=tmp))
        except Exception as err:  # MLflow raises several types for "no such artifact"
            raise MissingArtifactError(
                f"model version {version.name} v{version.version} has no '{BUNDLE}/' artifacts to fetch "
                f"({type(err).__name__}: {err}); it was registered before model folders travelled with their "
                "versions: run the pipeline once more on a machine that has the folders.") from err
        _swap_folder(local / MODEL, files.model_dir)
        if wanted and content_fingerprint(files.model_dir) != wanted:
            raise MissingArtifactError(f"the model fetched for {version.name} v{version.version} does not match the "
                                       f"version's fingerprint {wanted[:12]}: its artifacts were changed after registration.")
        for name, target in ((METRICS, files.metrics), (PREDICTIONS, files.predictions)):
            if (local / name).is_file():
                _copy_file(local / name, target)
        if files.prepared is not None:
            _swap_folder(local / PREPARED, files.prepared)
    return True


def _holds(files: BundleFiles, fingerprint: str | None) -> bool:
    return files.metrics.is_file() and _folder_is(files.model_dir, fingerprint)


def _folder_is(folder: Path, fingerprint: str | None) -> bool:
    """``folder`` exists and holds the model of that content fingerprint."""
    if not fingerprint or not folder.is_dir():
        return False
    try:
        return content_fingerprint(folder) == fingerprint
    except OSError:
        return False


def _swap_folder(source: Path, target: Path) -> None:
    with swapped_in(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def log_model_folder(run_id: str, model_dir: Path) -> str:
    """A model a worker made (a search trial's) under run ``run_id``'s ``bertshrink/model``; returns its
    content fingerprint, which ``fetch_model_folder`` checks."""
    log_artifact(run_id, Path(model_dir), f"{BUNDLE}/{MODEL}")
    return content_fingerprint(model_dir)


def fetch_model_folder(run_id: str, target: Path, fingerprint: str) -> bool:
    """Put run ``run_id``'s ``bertshrink/model`` at ``target`` (swapped in whole); False where ``target``
    already holds that model."""
    if _folder_is(target, fingerprint):
        return False
    with tempfile.TemporaryDirectory(prefix="bertshrink-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{BUNDLE}/{MODEL}",
                                                             dst_path=tmp))
        except Exception as err:  # MLflow raises several types for "no such artifact"
            raise MissingArtifactError(f"MLflow run {run_id} has no '{BUNDLE}/{MODEL}' artifacts to fetch "
                                       f"({type(err).__name__}: {err}).") from err
        _swap_folder(local, target)
    if content_fingerprint(target) != fingerprint:
        raise MissingArtifactError(f"the model fetched from MLflow run {run_id} does not match its fingerprint "
                                   f"{fingerprint[:12]}: its artifacts were changed after the run.")
    return True


def registration_record(version: ModelVersion, alias: str) -> dict:
    """What the register stage writes about a version, rebuilt from the registry."""
    tags = version.tags
    return {"name": version.name, "version": str(version.version), "alias": alias, "run_id": version.run_id,
            "model_uri": f"models:/{version.name}@{alias}", "model_id": getattr(version, "model_id", None),
            "data_content_hash": tags.get("data_content_hash"), "kind": tags.get("kind"),
            "flavor": tags.get("flavor"), "model_fingerprint": tags.get("model_fingerprint")}


def write_record(record: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2))


def model_version(model_name: str, version: str) -> ModelVersion:
    """Version ``version`` of ``model_name``, or a clear error naming both."""
    try:
        return MlflowClient().get_model_version(model_name, str(version))
    except mlflow.exceptions.MlflowException as err:
        raise MissingArtifactError(f"registered model {model_name} has no version {version} on this tracking "
                                   f"server ({err.message}): check MLFLOW_TRACKING_URI and registry.model_name.") from err


def done_recipe_version(model_name: str, recipe: str, teacher_fingerprint: str,
                        recipe_fingerprint: str) -> ModelVersion | None:
    """The newest registered result of ``recipe`` (as written now) on this teacher (by content), or None."""
    found = MlflowClient().search_model_versions(
        f"name='{model_name}' and tags.recipe='{recipe}' and tags.teacher_model_fingerprint='{teacher_fingerprint}' "
        f"and tags.recipe_fingerprint='{recipe_fingerprint}'")
    return max(found, key=lambda v: int(v.version), default=None)
