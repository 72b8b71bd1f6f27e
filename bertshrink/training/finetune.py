"""Fine-tuning a BERT-family classifier with transformers' ``Trainer``.

- seeded, progress bar on, cuda when present with bf16/fp16;
- checkpoints in a work folder outside the model output, so an interrupted run resumes, and only
  when the checkpoints were made from the same data and params (a fingerprint guards that);
- a NaN/inf loss stops training with ``TrainingError`` before anything is saved, so the last good
  model stays where it was;
- with ``distributed.processes`` > 1, DDP under torchrun (``ddp``, ``ddp_launch``): rank 0 alone
  writes the work folder's marker, the model folder and the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from bertshrink.config.knobs import DistributedKnobs, TrainingKnobs
from bertshrink.config.params import TeacherParams
from bertshrink.data.prepare import PreparedData, write_prepared
from bertshrink.errors import TrainingError
from bertshrink.modelfolder import load as model_loading
from bertshrink.modelfolder.load import load_fine_tuned_classifier, load_tokenizer_and_classifier
from bertshrink.modelfolder.meta import ModelMeta, save_model_folder
from bertshrink.modelfolder.structure import encoder_layers
from bertshrink.training import ddp

FINGERPRINT_FILE = "bertshrink-fingerprint.json"
TRAINER_STATE_FILE = "trainer_state.json"

log = logging.getLogger(__name__)


class GuardedTrainer(Trainer):
    """A ``Trainer`` that refuses to continue on a non-finite loss.

    Checked on every step (not only at logging steps), because one NaN step poisons the weights.
    Distillation trainers subclass this and override ``compute_task_loss``. ``examples_trained``
    counts the training examples this process saw (under DDP: its shard).
    """

    examples_trained = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = inputs.get("labels", inputs.get("input_ids"))
        if model.training and batch is not None:
            self.examples_trained += len(batch)
        loss, outputs = self.compute_task_loss(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"Training loss became {loss.detach().float().item()} at step "
                f"{self.state.global_step} (epoch {self.state.epoch or 0:.2f}). Lower "
                "teacher.learning_rate, or use precision fp32; the last good model was not "
                "overwritten."
            )
        return (loss, outputs) if return_outputs else loss

    def compute_task_loss(self, model, inputs, num_items_in_batch=None):
        """Loss and outputs; the default is the model's own cross-entropy."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        return loss, outputs


@dataclass
class TrainResult:
    """What a fine-tuning run produced: the folder, summary metrics and the per-step history."""

    model_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    device: str = "cpu"
    # world_size, backend, examples_per_rank, trained_module (and, distilling, teacher_module)
    distributed: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "model_dir": str(self.model_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainResult":
        return cls(**{**data, "model_dir": Path(data["model_dir"])})


def pick_device_and_precision(precision: str) -> tuple[str, dict[str, bool]]:
    """cuda when present; on it bf16 where supported else fp16 ('auto'); fp32 on CPU."""
    if not torch.cuda.is_available():
        if precision in ("fp16", "bf16"):
            raise TrainingError(f"precision={precision} needs a GPU; use 'auto' or 'fp32' on CPU.")
        return "cpu", {}
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "cuda", {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _training_code_hash() -> str:
    """This module's and the model loader's source, plus library versions: a code change must
    not resume from checkpoints that older code wrote."""
    digest = hashlib.sha256(f"{torch.__version__}|{transformers.__version__}".encode())
    for source in (Path(__file__), Path(model_loading.__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def fingerprint(params: dict[str, Any], data_hash: str, seed: int) -> str:
    """Identifies a training run: checkpoints are only resumed for the same fingerprint."""
    payload = json.dumps({"params": params, "data": data_hash, "seed": seed,
                          "code": _training_code_hash()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _resume_point(work_dir: Path, fp: str, resume: bool) -> str | None:
    """``_checkpoint_to_resume`` by rank 0 alone (it clears and renames); the other ranks then find
    the same checkpoint in the folder it left."""
    found = _checkpoint_to_resume(work_dir, fp, resume) if ddp.is_main_process() else None
    ddp.barrier()
    if not ddp.is_main_process() and resume:
        found = get_last_checkpoint(str(work_dir))
    return found


def _checkpoint_to_resume(work_dir: Path, fp: str, resume: bool) -> str | None:
    """Newest complete checkpoint of a run with the same fingerprint; stale checkpoints are cleared."""
    marker = work_dir / FINGERPRINT_FILE
    if work_dir.exists():
        same_run = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp
        if not (resume and same_run):
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp}))
    return newest_complete_checkpoint(work_dir) if resume else None


def _is_complete(checkpoint: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(work_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` a run can resume from; newer ones that a kill left half-written are
    renamed ``incomplete-checkpoint-N`` (never resumed; removed with the work folder once the run
    finishes), saying so."""
    while (last := get_last_checkpoint(str(work_dir))) is not None:
        if _is_complete(Path(last)):
            return last
        aside = Path(last).with_name(f"incomplete-{Path(last).name}")
        shutil.rmtree(aside, ignore_errors=True)
        Path(last).rename(aside)
        log.warning("Checkpoint %s was cut short (no %s; the run was killed while saving it): set aside as %s; "
                    "resuming from the newest complete checkpoint instead.", last, TRAINER_STATE_FILE, aside)
    return None


def tokenize_splits(prepared: PreparedData, tokenizer, max_length: int, names=("train", "validation")):
    """``datasets`` with input ids, truncated at ``max_length``; padding happens per batch."""
    return {name: tokenize_frame(prepared.splits[name], tokenizer, max_length) for name in names}


def tokenize_frame(frame, tokenizer, max_length: int):
    """A ``text``/``label`` frame as a ``datasets.Dataset`` of input ids and ``labels``."""
    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
    return ds.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")


def accuracy_metric(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def build_trainer(trainer_cls, model, args: TrainingArguments, encoded: dict, tokenizer, callbacks=None, **extra):
    """A Trainer on tokenized train/validation splits, padded per batch, reporting accuracy."""
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy_metric,
        callbacks=callbacks,
        **extra,
    )


# Checkpoint cadence of runs that never resume (distillation, recipe steps): effectively never.
NO_CHECKPOINTS = 10**9


def training_arguments(params: TrainingKnobs, work_dir: Path, seed: int, precision_flags: dict, device: str,
                       save_steps: int = NO_CHECKPOINTS) -> TrainingArguments:
    """transformers' ``TrainingArguments`` from our training knobs (under torchrun: DDP on the
    process group ``ddp_launch`` joined)."""
    return TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=params.epochs,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.eval_batch_size,
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        learning_rate=params.learning_rate,
        weight_decay=params.weight_decay,
        warmup_steps=params.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        eval_strategy="epoch",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=params.logging_steps,
        seed=seed,
        data_seed=seed,
        report_to="none",  # tracking is the tasks layer's job
        disable_tqdm=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        ddp_backend=ddp.backend(),
        **precision_flags,
    )


def fine_tune(prepared: PreparedData, source: str, knobs: TrainingKnobs, output_dir: Path, work_dir: Path, seed: int,
              max_length: int, *, save_steps: int = NO_CHECKPOINTS, resume: bool = False, layerdrop: float = 0.0,
              extra_meta: dict[str, Any] | None = None, callbacks: list | None = None,
              train_context: Callable[[Any], AbstractContextManager] | None = None) -> TrainResult:
    """Fine-tune the model at ``source`` on the prepared splits with ``knobs``; save it to ``output_dir``.

    ``resume`` continues from the newest checkpoint in ``work_dir`` of a run with the same
    fingerprint (checkpoints every ``save_steps``). ``extra_meta`` (e.g. the tracking run id) goes
    into the folder's metadata. ``train_context(model)`` wraps training and the final evaluation
    (e.g. fake quantization); it must leave a plain model behind when it exits, since that is what is saved.
    """
    set_seed(seed)
    device, precision_flags = pick_device_and_precision(knobs.precision)
    tokenizer, model = load_tokenizer_and_classifier(source, prepared.label_names, max_length)
    encoded = tokenize_splits(prepared, tokenizer, max_length)
    # What the run's result depends on: a change to any of it starts over instead of resuming.
    # The world size too: checkpoints of N processes hold N ranks' states and N-fold batches.
    params = {"model": source, "max_length": max_length, "layerdrop": layerdrop, "world_size": ddp.world_size(),
              **knobs.training_knobs().model_dump(mode="json")}
    fp = fingerprint(params, prepared.content_hash, seed)
    resume_from = _resume_point(Path(work_dir), fp, resume)
    if resume_from:
        log.info("Resuming training from %s (same data, params and code).", resume_from)
    args = training_arguments(knobs, Path(work_dir), seed, precision_flags, device, save_steps)
    trainer = build_trainer(GuardedTrainer, model, args, encoded, tokenizer, callbacks)
    with (train_context or _no_context)(model), layer_drop(model, layerdrop):
        train_output = trainer.train(resume_from_checkpoint=resume_from)
        eval_metrics = trainer.evaluate()
    _check_finite_weights(trainer.model)
    summary = ddp.run_summary(trainer.examples_trained, type(trainer.model_wrapped).__name__, [trainer.model])
    metrics = {**train_output.metrics, **eval_metrics}
    meta = ModelMeta(kind="teacher", source_model=source, label_names=prepared.label_names, max_length=max_length,
                     data_content_hash=prepared.content_hash, fingerprint=fp, params=knobs.model_dump(mode="json"),
                     seed=seed, train_metrics=metrics).updated(**(extra_meta or {}))
    if ddp.is_main_process():
        save_model_folder(trainer.model.cpu(), tokenizer, meta, output_dir)
    ddp.barrier()  # no rank still reads the checkpoints when rank 0 removes them
    if ddp.is_main_process():
        # Checkpoints exist to resume an interrupted run; once the model is saved they are spent.
        shutil.rmtree(work_dir, ignore_errors=True)
    return TrainResult(Path(output_dir), metrics, trainer.state.log_history, resume_from, device, summary)


def adopt_teacher(prepared: PreparedData, teacher: TeacherParams, output_dir: Path,
                  extra_meta: dict[str, Any] | None = None) -> TrainResult:
    """``teacher.train: false``: the fine-tuned classifier as it is, saved as the teacher folder with
    its outputs in the data's label order (so it evaluates, registers and compresses like ours)."""
    tokenizer, model = load_fine_tuned_classifier(teacher.model, prepared.label_names)
    meta = ModelMeta(kind="teacher", source_model=teacher.model, label_names=prepared.label_names,
                     max_length=teacher.max_length, data_content_hash=prepared.content_hash,
                     params={"train": False}).updated(**(extra_meta or {}))
    if ddp.is_main_process():  # run by hand under torchrun, every rank gets here
        save_model_folder(model, tokenizer, meta, output_dir)
    return TrainResult(Path(output_dir), {})


def train_teacher(prepared: PreparedData, teacher: TeacherParams, output_dir: Path, work_dir: Path, seed: int,
                  extra_meta: dict[str, Any] | None = None, callbacks: list | None = None,
                  distributed: DistributedKnobs | None = None) -> TrainResult:
    """The teacher section's fine-tuning: its model, length, checkpoints, LayerDrop and knobs; or,
    with ``train: false``, the given classifier as it is. ``distributed`` with more than one
    process trains under torchrun (DDP) and returns what rank 0 reported."""
    if not teacher.train:
        return adopt_teacher(prepared, teacher, output_dir, extra_meta)
    if ddp.wants_torchrun(distributed):
        return _train_teacher_under_torchrun(prepared, teacher, output_dir, work_dir, seed, extra_meta, callbacks,
                                             distributed)
    return fine_tune(prepared, teacher.model, teacher, output_dir, work_dir, seed, teacher.max_length,
                     save_steps=teacher.save_steps, resume=teacher.resume, layerdrop=teacher.layerdrop,
                     extra_meta=extra_meta, callbacks=callbacks)


def _train_teacher_under_torchrun(prepared: PreparedData, teacher: TeacherParams, output_dir: Path, work_dir: Path,
                                  seed: int, extra_meta: dict[str, Any] | None, callbacks: list | None,
                                  distributed: DistributedKnobs) -> TrainResult:
    """``train_teacher`` in ``distributed.processes`` processes (``ddp_launch`` runs it there)."""
    refuse_in_process_hooks("teacher", callbacks=callbacks)
    job = {"prepared_dir": stage_prepared_data(prepared, work_dir), "teacher": teacher.model_dump(mode="json"),
           "output_dir": str(output_dir), "work_dir": str(work_dir), "seed": seed, "extra_meta": extra_meta or {}}
    return TrainResult.from_json(ddp.run_under_torchrun("teacher", job, distributed, Path(work_dir)))


def stage_prepared_data(prepared: PreparedData, work_dir: Path) -> str:
    """The splits as the launched processes read them: a copy in the job folder (the caller may hold
    data that is in no folder, e.g. a test's)."""
    return str(write_prepared(prepared, ddp.job_folder(Path(work_dir)) / "prepared"))


def refuse_in_process_hooks(stage: str, **hooks: Any) -> None:
    """Callbacks and training contexts are Python objects of this process; torchrun's cannot get them."""
    given = [name for name, hook in hooks.items() if hook is not None]
    if given:
        raise TrainingError(f"{stage}: {', '.join(given)} cannot be passed to torchrun's processes; "
                            "set distributed.processes to 1 for this run.")


def _no_context(model) -> AbstractContextManager:
    return nullcontext()


@contextmanager
def layer_drop(model, probability: float):
    """LayerDrop while inside: in training mode each encoder layer is skipped with ``probability``.

    A skipped layer passes its input through unchanged (a forward hook replaces its output), so
    no gradient reaches it on that step. The layer is still computed; the point is robustness to
    removing layers later, not faster training. In eval mode nothing is dropped.
    """
    if probability <= 0:
        yield
        return

    def skip_sometimes(module, args, output):
        if module.training and torch.rand(()) < probability:
            return args[0]
        return output

    handles = [layer.register_forward_hook(skip_sometimes) for layer in encoder_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_finite_weights(model) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"Non-finite weights after training in {bad[:3]}; not saving this model.")
