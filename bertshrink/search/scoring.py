"""Build a trial's model and score it on the validation split (the test split is never read here).

Proxy: the trial's recipe with a short distillation on a seeded, stratified subset of the training
rows. Full: the same recipe with its own epochs on every training row. Scores: validation accuracy,
retention and agreement against the teacher (on validation), batch-1 forward p50/p95 from a quick
run of the usual latency code, and size on disk.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from bertshrink.compression.recipe import run_recipe
from bertshrink.config.params import EvaluateParams
from bertshrink.config.recipes import Recipe
from bertshrink.data.prepare import PreparedData
from bertshrink.evaluation.behaviour import fidelity
from bertshrink.evaluation.latency import fixed_threads, measure_latency
from bertshrink.evaluation.metrics import classification_metrics
from bertshrink.modelfolder.files import new_sibling_dir, replace_dir
from bertshrink.modelfolder.meta import update_meta
from bertshrink.modelfolder.runners import open_model
from bertshrink.modelfolder.size import size_on_disk

SEARCH_SPLITS = ("train", "validation")
WARMUP_ITERATIONS = 2


@dataclass(frozen=True)
class Reference:
    """The teacher on the validation split: what retention and agreement are measured against."""

    predictions: tuple[int, ...]
    accuracy: float


def without_test(prepared: PreparedData) -> PreparedData:
    """The data the search may see: train and validation (and the transfer texts), never test."""
    return replace(prepared, splits={k: v for k, v in prepared.splits.items() if k in SEARCH_SPLITS})


def _subset(frame: pd.DataFrame, rows: int, seed: int, stratify: bool) -> pd.DataFrame:
    if rows >= len(frame):
        return frame
    try:
        kept, _ = train_test_split(frame, train_size=rows, random_state=seed,
                                   stratify=frame["label"] if stratify else None)
    except ValueError:  # a class too small to stratify: a plain seeded sample
        kept = frame.sample(n=rows, random_state=seed)
    return kept.sort_index()


def proxy_data(prepared: PreparedData, rows: int | None, seed: int) -> PreparedData:
    """The search's data with the training rows (and transfer texts) cut to ``rows``; None = all."""
    data = without_test(prepared)
    if rows is None:
        return data
    splits = {**data.splits, "train": _subset(data.splits["train"], rows, seed, stratify=True)}
    transfer = None if data.transfer is None else _subset(data.transfer, rows, seed, stratify=False)
    return replace(data, splits=splits, transfer=transfer)


def _quick(evaluate: EvaluateParams, iterations: int) -> EvaluateParams:
    return evaluate.model_copy(update={"batch_sizes": (1,), "warmup_iterations": WARMUP_ITERATIONS,
                                       "timed_iterations": iterations})


def predict_validation(model_dir: Path, validation: pd.DataFrame, evaluate: EvaluateParams):
    """The model's runner and its class ids for every validation text."""
    runner = open_model(Path(model_dir), evaluate.threads)
    with fixed_threads(evaluate.threads):
        predictions = runner.predict(validation["text"].astype(str).tolist(), evaluate.eval_batch_size,
                                     min(evaluate.max_length, runner.max_length_limit))
    return runner, [int(p) for p in predictions]


def teacher_reference(teacher_dir: Path, prepared: PreparedData, evaluate: EvaluateParams) -> Reference:
    """The teacher's validation predictions and accuracy (computed once per search)."""
    validation = prepared.splits["validation"]
    runner, predictions = predict_validation(teacher_dir, validation, evaluate)
    accuracy = classification_metrics(validation["label"].to_numpy(), predictions, runner.num_labels)["accuracy"]
    return Reference(tuple(predictions), accuracy)


def score_model(model_dir: Path, prepared: PreparedData, reference: Reference, evaluate: EvaluateParams,
                latency_iterations: int, seed: int) -> dict:
    """Validation accuracy, retention and agreement against the teacher, batch-1 latency, size."""
    validation = prepared.splits["validation"]
    runner, predictions = predict_validation(model_dir, validation, evaluate)
    # the evaluate stage's own figures (its ``selection`` block), so search and promotion agree
    figures = fidelity(validation["label"].to_numpy(), predictions, list(reference.predictions), reference.accuracy)
    texts = validation["text"].astype(str).tolist()
    quick = _quick(evaluate, latency_iterations)
    quick = quick.model_copy(update={"max_length": min(quick.max_length, runner.max_length_limit)})
    latency = measure_latency(runner, runner.tokenizer, texts, 1, quick, seed)
    size = size_on_disk(Path(model_dir))["total_bytes"]
    return {"accuracy": figures["accuracy"], "retention": figures.get("retention"),
            "retention_low": figures.get("retention_low"), "agreement": figures["agreement"],
            "p50_ms": latency["p50_ms"], "p95_ms": latency["p95_ms"], "size_mb": size / 1e6,
            "parameters": runner.num_parameters()}


@dataclass(frozen=True)
class TrialBuild:
    """Where and how a trial's model is built."""

    teacher_dir: Path
    out_dir: Path
    work_dir: Path
    seed: int
    max_length: int
    logits_cache_dir: Path | None = None


def build_and_score(name: str, steps: list, build: TrialBuild, data: PreparedData, reference: Reference,
                    evaluate: EvaluateParams, latency_iterations: int, keep_model: bool = True) -> dict:
    """Run the recipe ``steps`` on ``data`` into ``build.out_dir`` and score it; with ``keep_model``
    False (proxy trials) the model folder is removed once scored. Adds ``build_seconds``."""
    started = time.perf_counter()
    records = run_recipe(name, Recipe.model_validate(steps), build.teacher_dir, data, build.out_dir,
                         build.work_dir, build.seed, build.max_length, logits_cache_dir=build.logits_cache_dir)
    built = time.perf_counter()
    scores = score_model(build.out_dir, data, reference, evaluate, latency_iterations, build.seed)
    scores.update(build_seconds=built - started, score_seconds=time.perf_counter() - built,
                  steps=" -> ".join(r.kind for r in records))
    if not keep_model:
        shutil.rmtree(build.out_dir, ignore_errors=True)
    return scores


def materialize(trial_dir: Path, target: Path, name: str, search: dict) -> Path:
    """A full trial's model as candidate ``name`` (``models/candidates/search-<k>``), swapped in whole,
    its metadata naming the recipe ``name`` and the search it came from."""
    tmp = new_sibling_dir(Path(target))
    try:
        shutil.copytree(trial_dir, tmp, dirs_exist_ok=True)
        update_meta(tmp, recipe=name, search=search)
        replace_dir(tmp, Path(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(target)
