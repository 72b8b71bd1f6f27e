"""Prefect tasks for promotion: apply ``bertshrink.promotion``'s rule and move MLflow aliases.

The pipeline moves ``challenger`` to the rule's choice, and ``champion`` only when
``registry.auto_promote`` allows it and the champion was not set by a person. Who set the
champion is kept as registered-model tags (``bertshrink.champion_set_by`` / ``_version``): an
alias moved in the MLflow UI no longer matches them, so the pipeline leaves it alone.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.params import BaseParams, RegistryParams
from bertshrink.promotion import (CHALLENGER_ALIAS, CHAMPION_ALIAS, Candidate, Constraints, candidate_from_result,
                                  candidate_from_tags, champion_decision, choose)
from tasks.report import read_json
from tasks.tracking import configure_tracking

SET_BY_TAG, SET_VERSION_TAG = "bertshrink.champion_set_by", "bertshrink.champion_version"


def constraints_of(registry: RegistryParams) -> Constraints:
    return Constraints(registry.min_retention, registry.min_agreement, registry.max_p95_ms, registry.max_size_mb)


def gather_candidates(base: BaseParams, names: list[str], failed: dict[str, str] | None = None) -> list[Candidate]:
    """Teacher + recipes as the rule sees them: metrics, registration record, interleaved latency."""
    comparison = read_json(Path(base.metrics_dir) / "comparison.json") or {}
    compared = comparison.get("models", {})
    candidates = []
    for name in names:
        if name in (failed or {}):
            candidates.append(Candidate(name, status="failed"))
            continue
        result = read_json(Path(base.metrics_dir) / f"{name}.json")
        record = read_json(Path(base.reports_dir) / "registry" / f"{name}.json")
        candidates.append(candidate_from_result(name, result, record, (compared.get(name) or {}).get("latency")))
    return candidates


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


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(registry: RegistryParams, base: BaseParams, names: list[str], failed: dict[str, str] | None = None) -> dict:
    """Choose by the rule, move ``challenger`` (and maybe ``champion``); write ``reports/promotion.json``."""
    configure_tracking(registry)
    client = MlflowClient()
    constraints = constraints_of(registry)
    candidates = gather_candidates(base, names, failed)
    choice = choose(candidates, constraints, registry.objective)
    champion, by_pipeline = current_champion(client, registry.model_name)
    decision = champion_decision(choice.chosen, champion, objective=registry.objective,
                                 margin=registry.promote_margin, auto_promote=registry.auto_promote,
                                 champion_set_by_pipeline=by_pipeline, constraints=constraints)
    if choice.chosen is not None:
        move_alias(client, registry.model_name, CHALLENGER_ALIAS, choice.chosen.version, choice.reason, "pipeline")
        client.set_model_version_tag(registry.model_name, choice.chosen.version, "promotion.champion.decision",
                                     ("promoted: " if decision.promote else "not promoted: ") + decision.reason[:4900])
    if decision.promote:
        move_alias(client, registry.model_name, CHAMPION_ALIAS, choice.chosen.version, decision.reason, "pipeline")
    record = {
        "model_name": registry.model_name, "objective": registry.objective,
        "constraints": constraints.__dict__, "margin": registry.promote_margin, "auto_promote": registry.auto_promote,
        "challenger": None if choice.chosen is None else {"name": choice.chosen.name, "version": choice.chosen.version},
        "reason": choice.reason, "eligible": list(choice.eligible), "rejected": choice.rejected,
        "champion_before": None if champion is None else {"name": champion.name, "version": champion.version,
                                                          "set_by_pipeline": by_pipeline},
        "champion_moved": decision.promote, "champion_reason": decision.reason,
    }
    out = Path(base.reports_dir) / "promotion.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record
