"""Log a model folder to MLflow's registry in the flavour that serves it: transformers for standard
BERT folders, onnx for ONNX candidates, a pyfunc model (``pyfunc_model.py``, carrying
``bertshrink/``) for restructured or torch-quantized ones; tag the version with its lineage."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import onnx
import pandas as pd
from huggingface_hub import ModelCard
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from transformers import pipeline

from bertshrink.config.params import RegistryParams
from bertshrink.modelfolder.files import META_FILE, ONNX_FILE
from bertshrink.modelfolder.load import is_restructured_folder
from bertshrink.modelfolder.meta import ModelMeta
from bertshrink.selection.promotion import CHAMPION_ALIAS, Candidate, candidate_from_tags
from tracking.runs import git_commit

SUMMARY_METRICS = ("test.accuracy", "test.macro_f1", "validation.accuracy", "size.total_bytes",
                   "parameters", "latency.batch_1.p50_ms", "latency.batch_1.p95_ms",
                   "behaviour.retention", "behaviour.agreement")  # the promotion rule reads these tags


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


def log_with_pyfunc(model_dir: str, registry: RegistryParams, metadata: dict):
    """Restructured (head/FFN-pruned, factorised) folders: our loader inside a pyfunc model."""
    signature = infer_signature(["an example text"], pd.DataFrame({"label": ["a"], "score": [0.5]}))
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={"model_dir": str(Path(model_dir).resolve())},
        code_paths=[str(LIBRARY_DIR)],
        pip_requirements=serving_requirements() + [f"pandas=={_installed('pandas')}"],
        signature=signature,
        input_example=["an example text"],
        registered_model_name=registry.model_name,
        metadata=metadata,
    )


ONNX_SERVING_PACKAGES = ("onnxruntime", "onnx", "tokenizers")
# Files an ONNX candidate needs beside the graph: tokenizer, labels, and our lineage.
ONNX_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json",
                    META_FILE)


def log_with_onnx_flavour(model_dir: str, registry: RegistryParams, metadata: dict):
    """ONNX candidates: MLflow's onnx flavour (CPU provider, one self-contained file) plus the tokenizer files."""
    folder = Path(model_dir).resolve()
    return mlflow.onnx.log_model(
        onnx_model=onnx.load(str(folder / ONNX_FILE)),
        name="model",
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,
        extra_files=[str(folder / f) for f in ONNX_EXTRA_FILES if (folder / f).is_file()],
        pip_requirements=[f"{name}=={_installed(name)}" for name in ONNX_SERVING_PACKAGES],
        registered_model_name=registry.model_name,
        metadata=metadata,
    )


def flavour_for(model_dir: str, meta: ModelMeta) -> str:
    """onnx for exported graphs; pyfunc (our loader) for restructured or torch-quantized folders; else transformers."""
    if meta.format == "onnx":
        return "onnx"
    if meta.torch_quantized or is_restructured_folder(Path(model_dir)):
        return "pyfunc"
    return "transformers"


def log_model_version(model_dir: str, meta: ModelMeta, summary: dict, registry: RegistryParams, run_id: str):
    """Log ``model_dir`` under ``run_id`` in its flavour and register it; returns (model info, flavour)."""
    metadata = {"bertshrink": meta.model_dump(mode="json", include={"kind", "recipe", "source_model", "label_names",
                                                                    "max_length", "format", "quantization"})}
    flavour = flavour_for(model_dir, meta)
    with mlflow.start_run(run_id=run_id):
        if flavour == "onnx":
            info = log_with_onnx_flavour(model_dir, registry, metadata)
        elif flavour == "pyfunc":
            info = log_with_pyfunc(model_dir, registry, metadata)
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
            "format": meta.format,
        })
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
