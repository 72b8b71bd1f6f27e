"""Prefect task for the register stage: log a model folder to MLflow in the flavour that serves it,
register it, tag the version with its lineage, and point an alias at it."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.params import RegistryParams
from bertshrink.errors import MissingArtifactError, retry_only_transient
from bertshrink.evaluation.metrics import flat_metrics
from bertshrink.modelfolder.meta import read_meta
from bertshrink.modelfolder.size import content_fingerprint
from bertshrink.selection.rules import stale_reason
from tracking.registry import SUMMARY_METRICS, log_model_version, version_tags
from tracking.runs import log_metrics
from tracking.transfer import BundleFiles, log_bundle, model_version, registration_record, write_record


# A tracking server can be briefly unreachable; retrying the whole registration is safe.
@task(name="register-model", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_only_transient,
      cache_policy=NO_CACHE)
def register_model(model_dir: str, metrics_file: str, registry: RegistryParams, alias: str, run_id: str,
                   record_file: str, bundle: BundleFiles | None = None) -> dict:
    """Log + register ``model_dir``; set ``alias``; write the registration record to ``record_file``.
    ``bundle`` (the folder, metrics, predictions; the prepared data for the teacher) is logged with
    the version so that another machine can fetch it (``tracking/transfer.py``).

    Standard BERT folders use MLflow's transformers flavour; ONNX graphs and restructured ones (pruned
    heads or FFN widths, factorised embeddings, torch-quantized) a pyfunc model that runs them with
    ``bertshrink.modelfolder.runners``; every version takes texts.
    """
    meta = read_meta(Path(model_dir))
    if not Path(metrics_file).is_file():
        raise MissingArtifactError(
            f"{metrics_file} not found: evaluate {model_dir} first "
            "(`python -m flows.evaluate` or `dvc repro evaluate`)."
        )
    result = json.loads(Path(metrics_file).read_text())
    fingerprint = content_fingerprint(Path(model_dir))
    stale = stale_reason(result, fingerprint, meta.data_content_hash)
    if stale:
        raise MissingArtifactError(
            f"{metrics_file} does not belong to the model in {model_dir}: {stale}. Evaluate first "
            f"(`python -m flows.evaluate --model-dir {model_dir}` or `dvc repro`), then register.")
    metrics = flat_metrics(result)
    summary = {k: metrics[k] for k in SUMMARY_METRICS if k in metrics}
    info, flavour = log_model_version(model_dir, meta, summary, registry, run_id)
    if bundle is not None:
        log_bundle(run_id, bundle)
    log_metrics(run_id, summary)
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {**version_tags(meta, result, summary), "flavor": flavour, "model_fingerprint": fingerprint}
    for key, value in tags.items():
        client.set_model_version_tag(registry.model_name, version, key, str(value)[:5000])
    client.set_registered_model_alias(registry.model_name, alias, version)
    # Read back from the registry: the same record a worker's fetch writes (tasks/transfer.py).
    record = registration_record(model_version(registry.model_name, version), alias)
    write_record(record, Path(record_file))
    return record
