"""Log a model folder to MLflow's registry in a flavour that serves it with text: transformers for
standard BERT folders, a pyfunc model (``pyfunc_model.py``, carrying ``bertshrink/``) for ONNX,
restructured or torch-quantized ones; tag the version with its lineage."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
from huggingface_hub import ModelCard
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import pipeline

from bertshrink.config.params import RegistryParams
from bertshrink.modelfolder.load import is_restructured_folder
from bertshrink.modelfolder.meta import ModelMeta
from bertshrink.selection.promotion import CHAMPION_ALIAS, Candidate, candidate_from_tags
from tracking.runs import git_commit

SUMMARY_METRICS = ("test.accuracy", "test.macro_f1", "validation.accuracy", "size.total_bytes",
                   "parameters", "latency.batch_1.p50_ms", "latency.batch_1.p95_ms",
                   "behaviour.retention", "behaviour.agreement",  # on test: reported
                   "selection.accuracy", "selection.retention", "selection.agreement",
                   "selection.retention_low", "selection.retention_high")  # on validation: the rule reads these tags


SERVING_PACKAGES = ("transformers", "torch", "tokenizers", "safetensors", "accelerate")
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY_DIR = Path(__file__).resolve().parent.parent / "bertshrink"


def _installed(name: str) -> str:
    return installed_version(name).split("+")[0]


def serving_requirements() -> list[str]:
    """The model's pip requirements, pinned to what trained it.

    Given explicitly because MLflow's default list adds torchvision, which a text model does not
    need and which has no CPU wheel here.
    """
    return [f"{name}=={_installed(name)}" for name in SERVING_PACKAGES]


def text_classification_pipeline(model_dir: str):
    """An absolute path: MLflow treats a relative 'models/teacher' as a Hub id and queries the Hub."""
    location = str(Path(model_dir).resolve())
    return pipeline("text-classification", model=location, tokenizer=location, device="cpu")


def model_card(meta: ModelMeta, summary: dict):
    """The card MLflow stores with the model, from our metadata (no Hub lookup)."""
    lines = [f"# {meta.kind} fine-tuned by bertshrink", "",
             f"- source model: `{meta.source_model}`", f"- labels: {meta.label_names}",
             f"- data content hash: `{meta.data_content_hash}`", f"- max length: {meta.max_length}",
             *[f"- {k}: {v}" for k, v in summary.items()]]
    return ModelCard("\n".join(lines))


def log_with_transformers_flavour(model_dir: str, card, registry: RegistryParams, metadata: dict):
    return mlflow.transformers.log_model(
        # A built pipeline, not the folder path: MLflow 3.17's path route breaks on transformers 5.
        transformers_model=text_classification_pipeline(model_dir),
        name="model",
        model_card=card,
        pip_requirements=serving_requirements(),
        registered_model_name=registry.model_name,
        metadata=metadata,
    )


def log_with_pyfunc(model_dir: str, registry: RegistryParams, metadata: dict, onnx: bool = False):
    """ONNX, restructured (head/FFN-pruned, factorised) and torch-quantized folders: our runner inside
    a pyfunc model that takes texts; the folder (an ONNX graph with its tokenizer) is its artifact."""
    extra = [f"{name}=={_installed(name)}" for name in ONNX_SERVING_PACKAGES] if onnx else []
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={"model_dir": str(Path(model_dir).resolve())},
        code_paths=[str(LIBRARY_DIR)],
        pip_requirements=serving_requirements() + [f"pandas=={_installed('pandas')}"] + extra,
        # No signature: MLflow's schema check would turn [1, 2] into ["1", "2"] and classify them;
        # the model's own check (texts_of) refuses a non-string, an empty list or a huge text with a 400.
        registered_model_name=registry.model_name,
        metadata=metadata,
    )


ONNX_SERVING_PACKAGES = ("onnxruntime", "onnx")


def flavour_for(model_dir: str, meta: ModelMeta) -> str:
    """pyfunc (our runner, text in) for ONNX graphs and restructured or torch-quantized folders;
    else transformers."""
    if meta.format == "onnx" or meta.torch_quantized or is_restructured_folder(Path(model_dir)):
        return "pyfunc"
    return "transformers"


def log_model_version(model_dir: str, meta: ModelMeta, summary: dict, registry: RegistryParams, run_id: str):
    """Log ``model_dir`` under ``run_id`` in its flavour and register it; returns (model info, flavour)."""
    metadata = {"bertshrink": meta.model_dump(mode="json", include={"kind", "recipe", "source_model", "label_names",
                                                                    "max_length", "format", "quantization"})}
    flavour = flavour_for(model_dir, meta)
    with mlflow.start_run(run_id=run_id):
        if flavour == "pyfunc":
            info = log_with_pyfunc(model_dir, registry, metadata, onnx=meta.format == "onnx")
        else:
            info = log_with_transformers_flavour(model_dir, model_card(meta, summary), registry, metadata)
    return info, flavour


def version_tags(meta: ModelMeta, result: dict, summary: dict) -> dict:
    """Lineage and headline metrics for the model version (searchable in the MLflow UI)."""
    tags = {
        "kind": meta.kind,
        "data_content_hash": meta.data_content_hash or "unknown",
        "git_commit": git_commit(),
        "training_run_id": meta.training_run_id or "unknown",
        "evaluation_run_id": result.get("evaluation_run_id", "unknown"),
        **{f"metric.{k}": v for k, v in summary.items()},
    }
    if meta.kind == "candidate":
        tags.update({
            "recipe": meta.recipe,
            "recipe_steps": json.dumps([{s["kind"]: s["params"]} for s in meta.recipe_steps or []]),
            "compress_run_id": meta.compress_run_id or "unknown",
            "teacher_training_run_id": meta.teacher_training_run_id or "unknown",
            "teacher_model_version": meta.teacher_model_version or "unknown",
            "teacher_model_fingerprint": meta.teacher_model_fingerprint or "unknown",
            "recipe_fingerprint": meta.recipe_fingerprint or "unknown",
            "format": meta.format,
        })
        if meta.search:   # a member of the search's front: false = a flagged front, nothing met the rule
            tags.update({"search.constraints_met": str(bool(meta.search.get("constraints_met"))).lower(),
                         "search.study": meta.search.get("study"), "search.trial": meta.search.get("trial")})
        if meta.quantization:
            tags["quantization"] = json.dumps(meta.quantization, sort_keys=True, default=str)
        if meta.calibration:
            calibration = meta.calibration
            tags.update({"calibration.split": calibration.get("split"), "calibration.rows": calibration.get("rows"),
                         "calibration.sha256": calibration.get("sha256"), "calibration.method": calibration.get("method")})
    else:
        tags["params"] = json.dumps(meta.params or {}, sort_keys=True)
    return tags


# --------------------------------------------------------------------------- aliases
# Who set the champion is kept as registered-model tags: an alias moved in the MLflow UI no longer
# matches them, so the pipeline leaves it alone.
SET_BY_TAG, SET_VERSION_TAG = "bertshrink.champion_set_by", "bertshrink.champion_version"


def current_champion(client: MlflowClient, model_name: str) -> tuple[Candidate | None, bool]:
    """The version behind ``@champion`` (None if unset) and whether the pipeline itself put it there."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None, True
    tags = client.get_registered_model(model_name).tags
    by_pipeline = tags.get(SET_BY_TAG) == "pipeline" and tags.get(SET_VERSION_TAG) == str(version.version)
    return candidate_from_tags(version_model_name(version), version.version, version.tags), by_pipeline


def version_model_name(version) -> str:
    """What our folders call a registered version: its recipe, or ``teacher``."""
    return version.tags.get("recipe") or version.tags.get("kind", "teacher")


def move_alias(client: MlflowClient, model_name: str, alias: str, version: str, reason: str, set_by: str) -> None:
    """Point ``alias`` at ``version`` and record the decision on the version (and, for champion, who set it)."""
    client.set_registered_model_alias(model_name, alias, version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in {f"promotion.{alias}.reason": reason, f"promotion.{alias}.set_by": set_by,
                       f"promotion.{alias}.at": stamp}.items():
        client.set_model_version_tag(model_name, version, key, value[:5000])
    if alias == CHAMPION_ALIAS:
        client.set_registered_model_tag(model_name, SET_BY_TAG, set_by)
        client.set_registered_model_tag(model_name, SET_VERSION_TAG, str(version))
