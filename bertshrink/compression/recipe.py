"""Run a compression recipe: each step reads the current model folder and writes the next one.

The teacher folder is never modified. Every step records parameters before/after and its time;
the last step's folder becomes the candidate, in the same format as the teacher, so the same
evaluate and register code handles it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bertshrink.compression import quantize_onnx
from bertshrink.compression.mixed_precision import Int8Options, mixed_precision
from bertshrink.compression.onnx_export import export_onnx
from bertshrink.compression.prune import (drop_layers, factorize_embeddings, head_importance, magnitude_prune,
                                          prune_ffn, prune_heads, prune_vocab, select_heads)
from bertshrink.compression.quantize_torch import quantize_torch
from bertshrink.config.knobs import DistributedKnobs
from bertshrink.config.recipes import (MIN_SENSITIVITY_ROWS, DistillStep, DropLayersStep, ExportOnnxStep,
                                       FactorizeEmbeddingsStep, FinetuneStep, MagnitudeStep, MixedPrecisionStep,
                                       PruneFfnStep, PruneHeadsStep, PruneVocabStep, QatStep, QuantizeStep,
                                       QuantNoiseStep, Recipe)
from bertshrink.data.calibration import select_calibration, select_rows
from bertshrink.data.prepare import PreparedData
from bertshrink.modelfolder.files import recover_leftovers, replace_dir
from bertshrink.modelfolder.load import load_folder
from bertshrink.modelfolder.meta import read_meta, save_model_folder, update_meta
from bertshrink.modelfolder.runners import open_model
from bertshrink.training.distill import distill
from bertshrink.training.finetune import fine_tune
from bertshrink.training.quant_training import quant_noise, quantization_aware

IMPORTANCE_BATCH_SIZE = 16


@dataclass
class StepRecord:
    """What one step did: for the candidate's metadata and the tracking run."""

    index: int
    kind: str
    params: dict[str, Any]
    parameters_before: int
    parameters_after: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeContext:
    """What every step may need besides the current model folder."""

    teacher_dir: Path
    prepared: PreparedData
    work_dir: Path
    seed: int
    max_length: int
    # Teacher logits kept across recipes (``training.teacher_logits``); None: one recipe's distill steps only.
    logits_cache_dir: Path | None = None
    # distill steps train under torchrun with more than one process (the other steps in this one).
    distributed: DistributedKnobs | None = None


def _save(model, tokenizer, source_dir: Path, target: Path) -> None:
    """An edited model keeps its source's metadata (kind, labels, lineage)."""
    save_model_folder(model, tokenizer, read_meta(source_dir), target)


def _importance_batches(tokenizer, prepared: PreparedData, n_batches: int, max_length: int, seed: int) -> list[dict]:
    """Labelled batches from the train split for gradient-based importance."""
    frame = prepared.splits["train"].sample(frac=1.0, random_state=seed)
    batches = []
    for start in range(0, min(len(frame), n_batches * IMPORTANCE_BATCH_SIZE), IMPORTANCE_BATCH_SIZE):
        chunk = frame.iloc[start:start + IMPORTANCE_BATCH_SIZE]
        batch = tokenizer(chunk["text"].tolist(), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(chunk["label"].to_numpy())
        batches.append(dict(batch))
    return batches


# ---------------------------------------------------------------- structural steps


def _edit_folder(current: Path, out: Path, edit: Callable) -> dict:
    """Load ``current``, apply ``edit(model, tokenizer) -> (model, tokenizer, report)``, save to ``out``."""
    model, tokenizer = load_folder(current)
    model, tokenizer, report = edit(model, tokenizer)
    _save(model, tokenizer, current, out)
    return report


def _model_only(prune_fn: Callable, *args, **kwargs) -> Callable:
    """Adapt ``prune_fn(model, ...) -> (model, report)`` to ``_edit_folder``'s edit signature."""
    def edit(model, tokenizer):
        model, report = prune_fn(model, *args, **kwargs)
        return model, tokenizer, report
    return edit


def _drop_layers(step: DropLayersStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    strategy = list(step.layers) if step.strategy == "explicit" else step.strategy
    return _edit_folder(current, out, _model_only(drop_layers, strategy, n_drop=step.n_drop))


def _prune_heads(step: PruneHeadsStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    def edit(model, tokenizer):
        batches = _importance_batches(tokenizer, ctx.prepared, step.importance_batches, ctx.max_length, ctx.seed)
        heads = select_heads(head_importance(model, batches), ratio=step.ratio, count=step.count, scope=step.scope)
        model, report = prune_heads(model, heads)
        return model, tokenizer, {"pruned_heads": {str(k): v for k, v in heads.items()}, **report}

    return _edit_folder(current, out, edit)


def _prune_ffn(step: PruneFfnStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    return _edit_folder(current, out, _model_only(prune_ffn, step.ratio))


def _prune_vocab(step: PruneVocabStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    # Training texts only (with the transfer texts, if any): evaluation texts must not decide
    # what the model can read.
    texts = ctx.prepared.splits["train"]["text"].tolist()
    if ctx.prepared.transfer is not None:
        texts += ctx.prepared.transfer["text"].tolist()
    return _edit_folder(current, out, lambda model, tokenizer: prune_vocab(model, tokenizer, texts,
                                                                          keep_tokens=step.keep_tokens))


def _factorize_embeddings(step: FactorizeEmbeddingsStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    return _edit_folder(current, out, _model_only(factorize_embeddings, step.rank))


def _magnitude(step: MagnitudeStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    return _edit_folder(current, out, _model_only(magnitude_prune, step.sparsity))


# ---------------------------------------------------------------- training steps


def _distill(step: DistillStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    # A step before this one already shaped the student; otherwise it is cut from the teacher.
    student_dir = None if current == ctx.teacher_dir else current
    result = distill(ctx.teacher_dir, ctx.prepared, step, out, ctx.work_dir / f"ckpt-{out.name}",
                     max_length=ctx.max_length, seed=ctx.seed, student_dir=student_dir,
                     logits_cache_dir=ctx.logits_cache_dir, distributed=ctx.distributed)
    return {"metrics": result.metrics, **({"distributed": result.distributed} if result.distributed else {})}


def _finetune(step: FinetuneStep, current: Path, out: Path, ctx: RecipeContext, train_context=None) -> dict:
    result = fine_tune(ctx.prepared, str(current), step.training_knobs(), out, ctx.work_dir / f"ckpt-{out.name}",
                       ctx.seed, ctx.max_length, extra_meta=read_meta(current).lineage(), train_context=train_context)
    return {"metrics": result.metrics}


def _quantization_context(step: QatStep | QuantNoiseStep) -> Callable:
    """``model -> context manager`` that trains ``model`` under fake quantization or quantization noise."""
    if isinstance(step, QatStep):
        return lambda model: quantization_aware(model, bits=step.bits, per_channel=True,
                                                quantize_activations=step.quantize_activations)
    return lambda model: quant_noise(model, p=step.p, block_size=step.block_size, bits=step.bits)


def _train_quantization_aware(step: QatStep | QuantNoiseStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    """A short distill or finetune of the current model with fake quantization (qat) or Quant-Noise on.

    The saved weights are the latent fp32 ones; ``export_onnx`` + ``quantize`` then make them int8.
    """
    context = _quantization_context(step)
    if step.method == "finetune":
        return _finetune(step, current, out, ctx, train_context=context)
    # The current model is the student (the teacher itself when this is the first step).
    result = distill(ctx.teacher_dir, ctx.prepared, step.as_distill_step(), out, ctx.work_dir / f"ckpt-{out.name}",
                     max_length=ctx.max_length, seed=ctx.seed, student_dir=current, train_context=context,
                     logits_cache_dir=ctx.logits_cache_dir)
    return {"metrics": result.metrics}


# ---------------------------------------------------------------- export and quantization


def _export_onnx(step: ExportOnnxStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    # Parity is checked on real validation texts: held out from training, not the reported test split.
    texts = ctx.prepared.splits["validation"]["text"].astype(str).tolist()[:step.parity_rows]
    return export_onnx(current, out, texts, ctx.max_length, opset=step.opset, optimize=step.optimize,
                       atol=step.atol, min_agreement=step.min_agreement)


def _quantize(step: QuantizeStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    if not step.onnx:
        return quantize_torch(current, out, step.mode)
    if step.mode == "dynamic":
        return quantize_onnx.quantize_dynamic_onnx(current, out, per_channel=step.per_channel,
                                                   include_embeddings=step.include_embeddings)
    if step.mode == "int4":
        return quantize_onnx.quantize_int4_onnx(current, out, block_size=step.block_size)
    return _quantize_static(step, current, out, ctx)


def _quantize_static(step: QuantizeStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    """Static int8 calibrated on training rows; the rows' provenance goes into the candidate's metadata."""
    texts, provenance = select_calibration(ctx.prepared.splits, step.calibration.split, step.calibration.rows, ctx.seed)
    provenance["method"] = step.calibration.method
    report = quantize_onnx.quantize_static_onnx(
        current, out, texts, ctx.max_length, method=step.calibration.method,
        per_channel=step.per_channel, quant_format=step.format,
        # keep_fp32 names op types or node names; each list ignores what it does not match.
        keep_fp32_op_types=step.keep_fp32, keep_fp32_nodes=step.keep_fp32, include_embeddings=step.include_embeddings)
    update_meta(out, calibration=provenance)
    return {**report, "calibration": provenance}


def _mixed_precision(step: MixedPrecisionStep, current: Path, out: Path, ctx: RecipeContext) -> dict:
    """Per-layer precision; sensitivity rows are a seeded sample of train (or validation), never of test."""
    rows, provenance = select_rows(ctx.prepared.splits, step.split, step.rows, ctx.seed,
                                   min_rows=MIN_SENSITIVITY_ROWS, eval_splits=("test",))
    calibration, calibration_texts = None, ()
    if step.int8 == "static":
        calibration_texts, calibration = select_calibration(ctx.prepared.splits, step.calibration.split,
                                                            step.calibration.rows, ctx.seed)
        calibration["method"] = step.calibration.method
    options = Int8Options(mode=step.int8, per_channel=step.per_channel, include_embeddings=step.include_embeddings,
                          block_size=step.block_size, calibration_texts=tuple(calibration_texts),
                          calibration_method=step.calibration.method, max_length=ctx.max_length)
    report = mixed_precision(current, out, low=step.low_precision, bits=step.bits, method=step.sensitivity,
                             texts=rows["text"].astype(str).tolist(), labels=rows["label"].to_numpy(),
                             rows_provenance=provenance, options=options, keep_layers=step.keep_layers,
                             threads=torch.get_num_threads())
    if calibration:
        update_meta(out, calibration=calibration)
        return {"mixed_precision": report, "calibration": calibration}
    return {"mixed_precision": report}


STEP_RUNNERS: dict[type, Callable[..., dict]] = {
    DropLayersStep: _drop_layers, PruneHeadsStep: _prune_heads, PruneFfnStep: _prune_ffn, PruneVocabStep: _prune_vocab,
    FactorizeEmbeddingsStep: _factorize_embeddings, MagnitudeStep: _magnitude, DistillStep: _distill,
    FinetuneStep: _finetune, QatStep: _train_quantization_aware, QuantNoiseStep: _train_quantization_aware,
    ExportOnnxStep: _export_onnx, QuantizeStep: _quantize, MixedPrecisionStep: _mixed_precision,
}


def _parameters(model_dir: Path) -> int:
    """Parameter count of any model folder (PyTorch, ONNX, quantized), through the runner that opens it."""
    return open_model(model_dir, threads=1).num_parameters()


def run_recipe(name: str, recipe: Recipe, teacher_dir: Path, prepared: PreparedData, output_dir: Path,
               work_dir: Path, seed: int, max_length: int, extra_meta: dict[str, Any] | None = None,
               logits_cache_dir: Path | None = None, distributed: DistributedKnobs | None = None) -> list[StepRecord]:
    """Apply ``recipe`` to a copy of the teacher; the candidate lands in ``output_dir`` whole.

    ``extra_meta`` (e.g. tracking ids) is written into the candidate's ``bertshrink.json``;
    ``logits_cache_dir`` keeps the teacher's logits for the distill steps of later recipes;
    ``distributed`` runs the distill steps under torchrun (DDP) when it asks for more than one process.
    """
    teacher_dir, work_dir = Path(teacher_dir), Path(work_dir)
    recover_leftovers(Path(output_dir))  # a candidate swap a kill interrupted: put the old one back
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    ctx = RecipeContext(teacher_dir, prepared, work_dir, seed, max_length, logits_cache_dir, distributed)
    current, records = teacher_dir, []
    before = _parameters(teacher_dir)
    for index, step in enumerate(recipe.steps):
        out = work_dir / f"step-{index:02d}-{step.kind}"
        started = time.perf_counter()
        details = STEP_RUNNERS[type(step)](step, current, out, ctx)
        after = _parameters(out)
        records.append(StepRecord(index, step.kind, step.model_dump(mode="json", exclude={"kind"}), before, after,
                                  time.perf_counter() - started, details))
        current, before = out, after
    _finish_candidate(name, current, teacher_dir, records, Path(output_dir), extra_meta or {})
    shutil.rmtree(work_dir, ignore_errors=True)
    return records


def _finish_candidate(name: str, last: Path, teacher_dir: Path, records: list[StepRecord], output_dir: Path,
                      extra_meta: dict[str, Any]) -> None:
    """Stamp the recipe and lineage into the last step's folder and swap it in as the candidate."""
    teacher = read_meta(teacher_dir)
    update_meta(last, kind="candidate", recipe=name, recipe_steps=[asdict(r) for r in records],
                teacher_dir=str(teacher_dir), teacher_training_run_id=teacher.training_run_id,
                data_content_hash=teacher.data_content_hash, label_names=teacher.label_names, **extra_meta)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(last, output_dir)
