"""Prefect task for repeats over seeds: a candidate's recipe rebuilt with other seeds, scored on test.

Kept apart from ``tasks.evaluate`` so that measuring a model does not depend on the compression code
(DVC reruns a stage when code it runs changes; the teacher's evaluation runs no recipe).
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import EvaluateParams
from bertshrink.config.recipes import Recipe
from bertshrink.data.prepare import load_prepared
from bertshrink.evaluation.metrics import flat_metrics
from bertshrink.evaluation.repeats import repeat_over_seeds
from bertshrink.modelfolder.meta import read_meta
from tasks.evaluate import teacher_reference
from tracking.runs import log_artifact, log_metrics


@task(name="repeat-over-seeds", cache_policy=NO_CACHE)
def seed_spread_task(name: str, recipe: Recipe, evaluate: EvaluateParams, paths: Artifacts, seed: int) -> dict:
    """Rebuild ``recipe`` with ``evaluate.seeds - 1`` more seeds; add the mean and spread of its test scores
    under ``seeds`` in ``metrics/<name>.json`` and on its evaluation run."""
    out = paths.metrics(name)
    result = json.loads(out.read_text())
    test = result["metrics"]["test"]
    first = {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
             "agreement": result.get("behaviour", {}).get("agreement")}
    teacher_predictions = (teacher_reference(paths, name, result)[0] or {}).get("test")  # the seeds' spread reports test
    max_length = int(read_meta(paths.teacher).max_length or evaluate.max_length)
    result["seeds"] = repeat_over_seeds(name, recipe, paths.teacher, load_prepared(paths.prepared),
                                        paths.checkpoints("seeds", name), first, seed, evaluate.seeds, max_length,
                                        evaluate, teacher_predictions)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    run_id = result.get("evaluation_run_id")
    if run_id:
        log_metrics(run_id, flat_metrics({"seeds": result["seeds"]}))
        log_artifact(run_id, out)
    return result
