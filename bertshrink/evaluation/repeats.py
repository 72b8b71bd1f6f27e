"""Repeat a recipe over seeds, so a gain can be told from noise.

Each extra seed rebuilds the candidate from the teacher with ``seed`` changed (data order, student
initialisation, calibration draw), scores it on the test split and deletes it. Latency is not
repeated: the architecture, hence the speed, does not change with the seed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from bertshrink.evaluation.behaviour import agreement, spread
from bertshrink.compression.recipe import run_recipe
from bertshrink.data.prepare import PreparedData
from bertshrink.evaluation.latency import fixed_threads
from bertshrink.evaluation.metrics import classification_metrics
from bertshrink.modelfolder.runners import open_model
from bertshrink.config.params import EvaluateParams
from bertshrink.config.recipes import Recipe


def seeds_for(base_seed: int, n: int) -> list[int]:
    """``n`` seeds starting at the pipeline's own (whose candidate already exists)."""
    return [base_seed + k for k in range(n)]


def score_on_test(model_dir: Path, prepared: PreparedData, params: EvaluateParams,
                  teacher_predictions: Sequence[int] | None) -> dict:
    """Test accuracy, macro-F1 and agreement with the teacher of one model folder."""
    runner = open_model(model_dir, params.threads)
    test = prepared.splits["test"]
    with fixed_threads(params.threads):
        predictions = runner.predict(test["text"].astype(str).tolist(), params.eval_batch_size, params.max_length)
    scores = classification_metrics(test["label"].to_numpy(), predictions, runner.num_labels)
    scores["agreement"] = None if teacher_predictions is None else agreement(predictions, teacher_predictions)
    return scores


def repeat_over_seeds(name: str, recipe: Recipe, teacher_dir: Path, prepared: PreparedData, work_dir: Path,
                      first: dict, base_seed: int, n_seeds: int, max_length: int, params: EvaluateParams,
                      teacher_predictions: Sequence[int] | None = None) -> dict:
    """Mean and spread of accuracy, macro-F1 and agreement over ``n_seeds`` builds of ``recipe``.

    ``first`` holds the scores of the existing candidate (built with ``base_seed``); the other
    seeds are built in ``work_dir`` and removed after scoring.
    """
    seeds = seeds_for(base_seed, n_seeds)
    runs = [{"seed": seeds[0], **first}]
    for seed in seeds[1:]:
        out = Path(work_dir) / f"seed-{seed}"
        try:
            run_recipe(name, recipe, teacher_dir, prepared, out, Path(work_dir) / f"work-{seed}", seed, max_length)
            runs.append({"seed": seed, **score_on_test(out, prepared, params, teacher_predictions)})
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return {"seeds": seeds, "runs": runs,
            **{key: spread([r.get(key) for r in runs]) for key in ("accuracy", "macro_f1", "agreement")}}
