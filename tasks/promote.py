"""Prefect task for promotion: apply ``bertshrink.selection.promotion``'s rule and move MLflow aliases.

The pipeline moves ``challenger`` to the rule's choice, and ``champion`` only when
``registry.auto_promote`` allows it and the champion was not set by a person. Who set the
champion is kept as registered-model tags (``tracking.registry.move_alias``): an alias moved in
the MLflow UI no longer matches them, so the pipeline leaves it alone.
"""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import Artifacts, read_json
from bertshrink.config.params import RegistryParams
from bertshrink.selection.promotion import (CHALLENGER_ALIAS, CHAMPION_ALIAS, Candidate, candidate_from_result,
                                            champion_decision, choose, constraints_of)
from tracking.registry import current_champion, move_alias
from tracking.runs import configure_tracking


def gather_candidates(paths: Artifacts, names: list[str], failed: dict[str, str] | None = None) -> list[Candidate]:
    """Teacher + recipes as the rule sees them: metrics, registration record, interleaved latency."""
    comparison = read_json(paths.comparison) or {}
    compared = comparison.get("models", {})
    candidates = []
    for name in names:
        if name in (failed or {}):
            candidates.append(Candidate(name, status="failed"))
            continue
        result = read_json(paths.metrics(name))
        record = read_json(paths.registry_record(name))
        candidates.append(candidate_from_result(name, result, record, (compared.get(name) or {}).get("latency")))
    return candidates


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(registry: RegistryParams, paths: Artifacts, names: list[str], failed: dict[str, str] | None = None) -> dict:
    """Choose by the rule, move ``challenger`` (and maybe ``champion``); write ``reports/promotion.json``."""
    configure_tracking(registry)
    client = MlflowClient()
    constraints = constraints_of(registry)
    candidates = gather_candidates(paths, names, failed)
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
        "constraints": constraints.model_dump(), "margin": registry.promote_margin, "auto_promote": registry.auto_promote,
        "challenger": None if choice.chosen is None else {"name": choice.chosen.name, "version": choice.chosen.version},
        "reason": choice.reason, "eligible": list(choice.eligible), "rejected": choice.rejected,
        "champion_before": None if champion is None else {"name": champion.name, "version": champion.version,
                                                          "set_by_pipeline": by_pipeline},
        "champion_moved": decision.promote, "champion_reason": decision.reason,
    }
    out = paths.promotion
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record
