"""Prefect tasks that move model folders through the tracking server (``tracking/transfer.py``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.params import Params
from bertshrink.errors import MissingArtifactError, retry_only_transient
from tracking.transfer import bundle_files, fetch_bundle, model_version, registration_record, write_record


# Downloads can hit a briefly unreachable server; fetching again is safe (folders are swapped in whole).
@task(name="fetch-teacher", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_only_transient,
      cache_policy=NO_CACHE)
def fetch_teacher_task(params: Params, version: str) -> bool:
    """Put teacher version ``version`` (folder, metrics, predictions, prepared data) in this checkout's
    places; False where they already were. Also writes its registration record, which the recipe's
    lineage tags read."""
    paths = Artifacts(params.base)
    found = model_version(params.registry.model_name, version)
    if found.tags.get("kind") != TEACHER:
        raise MissingArtifactError(f"{params.registry.model_name} v{version} is a {found.tags.get('kind')}, not the "
                                   "teacher: pass the teacher's version.")
    paths.require_writable(paths.teacher.parent, paths.prepared.parent, paths.metrics(TEACHER).parent)
    fetched = fetch_bundle(found, bundle_files(paths, TEACHER, paths.teacher))
    write_record(registration_record(found, params.registry.teacher_alias), paths.registry_record(TEACHER))
    return fetched


@task(name="fetch-candidate", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_only_transient,
      cache_policy=NO_CACHE)
def fetch_candidate_task(params: Params, recipe: str, version: str) -> dict:
    """Put a worker's registered candidate of ``recipe`` in this machine's places; returns its
    evaluation result (the metrics file, with ``model_dir``) and registration record."""
    paths = Artifacts(params.base)
    found = model_version(params.registry.model_name, version)
    fetch_bundle(found, bundle_files(paths, recipe, paths.candidate(recipe)))
    record = {**registration_record(found, recipe), "model_dir": str(paths.candidate(recipe))}
    write_record(record, paths.registry_record(recipe))
    return record
