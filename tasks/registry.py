"""Prefect task for the register stage: log a model folder to MLflow (transformers flavour; onnx
flavour for ONNX candidates; a pyfunc model for restructured or torch-quantized ones), register it,
tag the version with its lineage, and point an alias at it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE
from transformers import AutoConfig

from bertshrink.errors import MissingArtifactError
from bertshrink.measure import flat_metrics
from bertshrink.modeling import read_model_meta
from bertshrink.params import RegistryParams
from bertshrink.structure import is_restructured
from tasks.tracking import git_commit, log_metrics

SUMMARY_METRICS = ("test.accuracy", "test.macro_f1", "validation.accuracy", "size.total_bytes",
                   "parameters", "latency.batch_1.p50_ms", "latency.batch_1.p95_ms",
                   "behaviour.retention", "behaviour.agreement")  # the promotion rule reads these tags


SERVING_PACKAGES = ("transformers", "torch", "tokenizers", "safetensors", "accelerate")
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY_DIR = Path(__file__).resolve().parent.parent / "bertshrink"


def _installed(name: str) -> str:
    from importlib.metadata import version

    return version(name).split("+")[0]


def serving_requirements() -> list[str]:
    """The model's pip requirements, pinned to what trained it.

    Given explicitly because MLflow's default list adds torchvision, which a text model does not
    need and which has no CPU wheel here.
    """
    return [f"{name}=={_installed(name)}" for name in SERVING_PACKAGES]


def text_classification_pipeline(model_dir: str):
    """An absolute path: MLflow treats a relative 'models/teacher' as a Hub id and queries the Hub."""
    from transformers import pipeline

    location = str(Path(model_dir).resolve())
    return pipeline("text-classification", model=location, tokenizer=location, device="cpu")


def model_card(meta: dict, summary: dict):
    """The card MLflow stores with the model, from our metadata (no Hub lookup)."""
    from huggingface_hub import ModelCard

    lines = [f"# {meta.get('kind', 'model')} fine-tuned by bertshrink", "",
             f"- source model: `{meta.get('source_model')}`", f"- labels: {meta.get('label_names')}",
             f"- data content hash: `{meta.get('data_content_hash')}`", f"- max length: {meta.get('max_length')}",
             *[f"- {k}: {v}" for k, v in summary.items()]]
    return ModelCard("\n".join(lines))


def _log_with_transformers_flavour(model_dir: str, card, registry: RegistryParams, metadata: dict):
    return mlflow.transformers.log_model(
        # A built pipeline, not the folder path: MLflow 3.17's path route breaks on transformers 5.
        transformers_model=text_classification_pipeline(model_dir),
        name="model",
        model_card=card,
        pip_requirements=serving_requirements(),
        registered_model_name=registry.model_name,
        metadata=metadata,
    )


def _log_with_pyfunc(model_dir: str, registry: RegistryParams, metadata: dict):
    """Restructured (head/FFN-pruned, factorised) folders: our loader inside a pyfunc model."""
    from mlflow.models import infer_signature

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
                    "bertshrink.json")


def _log_with_onnx_flavour(model_dir: str, registry: RegistryParams, metadata: dict):
    """ONNX candidates: MLflow's onnx flavour (CPU provider, one self-contained file) plus the tokenizer files."""
    import onnx

    folder = Path(model_dir).resolve()
    return mlflow.onnx.log_model(
        onnx_model=onnx.load(str(folder / "model.onnx")),
        name="model",
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,
        extra_files=[str(folder / f) for f in ONNX_EXTRA_FILES if (folder / f).is_file()],
        pip_requirements=[f"{name}=={_installed(name)}" for name in ONNX_SERVING_PACKAGES],
        registered_model_name=registry.model_name,
        metadata=metadata,
    )


def flavour_for(model_dir: str) -> str:
    """onnx for exported graphs; pyfunc (our loader) for restructured or torch-quantized folders; else transformers."""
    folder = Path(model_dir).resolve()
    if (folder / "model.onnx").is_file():
        return "onnx"
    meta = read_model_meta(folder)
    if meta.get("quantization", {}).get("backend") == "torch" or is_restructured(AutoConfig.from_pretrained(str(folder))):
        return "pyfunc"
    return "transformers"


def version_tags(meta: dict, result: dict, summary: dict) -> dict:
    """Lineage and headline metrics for the model version (searchable in the MLflow UI)."""
    tags = {
        "kind": meta.get("kind", "unknown"),
        "data_content_hash": meta.get("data_content_hash", "unknown"),
        "git_commit": git_commit(),
        "training_run_id": meta.get("training_run_id", "unknown"),
        "evaluation_run_id": result.get("evaluation_run_id", "unknown"),
        **{f"metric.{k}": v for k, v in summary.items()},
    }
    if meta.get("kind") == "candidate":
        tags.update({
            "recipe": meta.get("recipe"),
            "recipe_steps": json.dumps([{s["kind"]: s["params"]} for s in meta.get("recipe_steps", [])]),
            "compress_run_id": meta.get("compress_run_id", "unknown"),
            "teacher_training_run_id": meta.get("teacher_training_run_id", "unknown"),
            "teacher_model_version": meta.get("teacher_model_version", "unknown"),
            "format": meta.get("format", "pytorch"),
        })
        if meta.get("quantization"):
            tags["quantization"] = json.dumps(meta["quantization"], sort_keys=True, default=str)
        if meta.get("calibration"):
            calibration = meta["calibration"]
            tags.update({"calibration.split": calibration.get("split"), "calibration.rows": calibration.get("rows"),
                         "calibration.sha256": calibration.get("sha256"), "calibration.method": calibration.get("method")})
    else:
        tags["params"] = json.dumps(meta.get("params", {}), sort_keys=True)
    return tags


# A tracking server can be briefly unreachable; retrying the whole registration is safe.
@task(name="register-model", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_model(model_dir: str, metrics_file: str, registry: RegistryParams, alias: str, run_id: str,
                   record_file: str) -> dict:
    """Log + register ``model_dir``; set ``alias``; write the registration record to ``record_file``.

    Standard BERT folders use MLflow's transformers flavour; restructured ones (pruned heads or
    FFN widths, factorised embeddings) a pyfunc model that loads them with ``bertshrink.structure``.
    """
    meta = read_model_meta(Path(model_dir))
    if not Path(metrics_file).is_file():
        raise MissingArtifactError(
            f"{metrics_file} not found: evaluate {model_dir} first "
            "(`python -m flows.evaluate` or `dvc repro evaluate`)."
        )
    result = json.loads(Path(metrics_file).read_text())
    metrics = flat_metrics(result)
    summary = {k: metrics[k] for k in SUMMARY_METRICS if k in metrics}
    metadata = {"bertshrink": {k: meta.get(k) for k in ("kind", "recipe", "source_model", "label_names", "max_length",
                                                         "format", "quantization")}}
    flavour = flavour_for(model_dir)
    with mlflow.start_run(run_id=run_id):
        if flavour == "onnx":
            info = _log_with_onnx_flavour(model_dir, registry, metadata)
        elif flavour == "pyfunc":
            info = _log_with_pyfunc(model_dir, registry, metadata)
        else:
            info = _log_with_transformers_flavour(model_dir, model_card(meta, summary), registry, metadata)
    log_metrics(run_id, summary)
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {**version_tags(meta, result, summary), "flavor": flavour}
    for key, value in tags.items():
        client.set_model_version_tag(registry.model_name, version, key, str(value)[:5000])
    client.set_registered_model_alias(registry.model_name, alias, version)
    record = {"name": registry.model_name, "version": version, "alias": alias, "run_id": run_id,
              "model_uri": f"models:/{registry.model_name}@{alias}", "model_id": info.model_id,
              "data_content_hash": tags["data_content_hash"], "kind": tags["kind"], "flavor": tags["flavor"]}
    Path(record_file).parent.mkdir(parents=True, exist_ok=True)
    Path(record_file).write_text(json.dumps(record, indent=2))
    return record
