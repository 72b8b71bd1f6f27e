"""Knowledge distillation of a BERT classifier into a smaller one (DistilBERT, TinyBERT).

The losses are in ``losses``; how to distill is the typed recipe step ``config.recipes.DistillStep``.
Students are made from the teacher by keeping some of its encoder layers (DistilBERT's
"every other layer" initialisation, ``init_student_from_teacher``) or loaded from any smaller
BERT folder. ``distill`` trains one with ``DistillationTrainer`` and saves it in the same model
folder format as the teacher (``kind: "distilled"``). With ``distributed.processes`` > 1 it runs
under torchrun (DDP): the student is wrapped, the frozen teacher stays a plain module on each
rank's device, and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from torch import nn
from transformers import set_seed
from transformers.modeling_outputs import SequenceClassifierOutput

from bertshrink.config.knobs import DistributedKnobs
from bertshrink.config.recipes import INTERMEDIATE_LOSSES, PREDICTION_LOSSES, DistillStep
from bertshrink.data.prepare import PreparedData
from bertshrink.modelfolder.load import load_classifier_with_labels, load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, save_model_folder
from bertshrink.modelfolder.size import content_fingerprint, count_parameters
from bertshrink.modelfolder.structure import keep_layers
from bertshrink.training.losses import (attention_loss, embedding_mse_loss, hidden_mse_loss, kd_logits_loss,
                                        labelled_cross_entropy)
from bertshrink.training import ddp
from bertshrink.training.augment import augment_texts
from bertshrink.training.teacher_logits import LOGITS_COLUMN, cached_teacher_logits, with_teacher_logits
from bertshrink.training.finetune import (
    GuardedTrainer,
    TrainResult,
    _check_finite_weights,
    build_trainer,
    pick_device_and_precision,
    refuse_in_process_hooks,
    stage_prepared_data,
    tokenize_frame,
    tokenize_splits,
    training_arguments,
)

INTERMEDIATE, PREDICTION = INTERMEDIATE_LOSSES, PREDICTION_LOSSES
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- students


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer (0-based transformer layer) that each student layer learns from, TinyBERT-style.

    Student layer ``i`` maps to teacher layer ``floor((i + 1) * n_teacher / n_student) - 1``; when
    ``n_teacher`` is a multiple ``k`` of ``n_student`` this is TinyBERT's ``(i + 1) * k - 1``, e.g.
    ``(3, 6) -> [1, 3, 5]``. Otherwise the gaps are spread as evenly as integers allow; the last
    student layer always maps to the last teacher layer and the map strictly increases.
    """
    for name, value in (("n_student", n_student), ("n_teacher", n_teacher)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    if n_student > n_teacher:
        raise ValueError(f"the student cannot have more layers than the teacher ({n_student} > {n_teacher})")
    return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]


def _check_layers(layers: list[int], n_teacher: int, what: str) -> list[int]:
    layers = list(layers)
    if not layers:
        raise ValueError(f"{what} must name at least one teacher layer")
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_teacher]
    if bad:
        raise ValueError(f"{what} {layers} has indices outside 0..{n_teacher - 1} (the teacher has {n_teacher} layers): {bad}")
    return layers


def init_student_from_teacher(teacher_model, layers: list[int]):
    """A deep copy of ``teacher_model`` that keeps only the encoder layers ``layers`` (0-based).

    DistilBERT initialises its student from every other teacher layer (``layers=[0, 2, 4, ...]``).
    Embeddings, pooler and classifier are copied; ``config.num_hidden_layers`` is updated, so the
    saved student loads back with ``AutoModelForSequenceClassification.from_pretrained``.
    Duplicate indices are refused (they would tie nothing and only waste capacity).
    """
    n_teacher = teacher_model.config.num_hidden_layers
    layers = _check_layers(layers, n_teacher, "layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} repeats a teacher layer")
    student = copy.deepcopy(teacher_model)
    keep_layers(student, layers)
    return student


# ------------------------------------------------------------------------------------- trainer


class DistillationTrainer(GuardedTrainer):
    """Trains the student (``model``) against a frozen ``teacher``.

    ``weights`` maps 'ce', 'kd', 'hidden', 'attention', 'embedding' to loss weights; ``layer_map``
    gives the teacher layer for each student layer. Projections (``W_h`` for hidden states,
    ``W_e`` for embeddings, TinyBERT) are made when widths differ; they live in
    ``self.projections``, outside the student, so they are trained (added to the optimizer) but
    never saved with it. The last step's weighted-out components are in ``last_loss_components``.
    Under DDP only the student is wrapped: the teacher is frozen (nothing to synchronise), and the
    projections start from rank 0's weights and their gradients are averaged by hooks (``ddp.keep_in_sync``).
    """

    def __init__(self, *args, teacher, weights: dict[str, float], layer_map: list[int] | None = None,
                 temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        unknown = set(weights) - set(INTERMEDIATE) - set(PREDICTION)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}")
        self.weights = {k: float(weights.get(k, 0.0)) for k in (*PREDICTION, *INTERMEDIATE)}
        self.temperature = temperature
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        s_cfg, t_cfg = self.model.config, self.teacher.config
        self.layer_map = list(layer_map) if layer_map is not None else uniform_layer_map(
            s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
        if len(self.layer_map) != s_cfg.num_hidden_layers:
            raise ValueError(f"layer_map has {len(self.layer_map)} entries but the student has "
                             f"{s_cfg.num_hidden_layers} layers")
        _check_layers(self.layer_map, t_cfg.num_hidden_layers, "layer_map")
        if self.weights["attention"] > 0 and s_cfg.num_attention_heads != t_cfg.num_attention_heads:
            raise ValueError(f"attention loss needs equal head counts: student has {s_cfg.num_attention_heads}, "
                             f"teacher has {t_cfg.num_attention_heads}")
        self.projections = nn.ModuleDict()
        self.teacher_passes = 0  # live teacher forward passes in training steps (0 with cached logits)
        if s_cfg.hidden_size != t_cfg.hidden_size:
            if self.weights["hidden"] > 0:
                self.projections["hidden"] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size)
            if self.weights["embedding"] > 0:
                self.projections["embedding"] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size)
        self.projections.to(self.args.device)
        ddp.keep_in_sync(self.projections)
        self.last_loss_components: dict[str, float] = {}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        present = {id(q) for group in optimizer.param_groups for q in group["params"]}
        params = [p for p in self.projections.parameters() if p.requires_grad and id(p) not in present]
        if params:  # before the scheduler is made, so it schedules this group too
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the cached teacher logits column: the model's forward does not take it, we do."""
        super()._set_signature_columns_if_needed()
        if LOGITS_COLUMN not in self._signature_columns:
            self._signature_columns.append(LOGITS_COLUMN)

    def compute_task_loss(self, model, inputs, num_items_in_batch=None):
        w = self.weights
        need_hidden = w["hidden"] > 0 or w["embedding"] > 0
        need_attn = w["attention"] > 0
        mask = inputs.get("attention_mask")
        if self.projections.training != model.training:
            self.projections.train(model.training)
        labels = inputs.get("labels")
        cached = inputs.get(LOGITS_COLUMN)
        features = {k: v for k, v in inputs.items() if k not in ("labels", LOGITS_COLUMN)}
        out = model(**features, output_hidden_states=need_hidden, output_attentions=need_attn)
        if cached is not None and not (need_hidden or need_attn):
            t_out = SequenceClassifierOutput(logits=cached.to(out.logits.dtype))  # no teacher pass
        else:
            with torch.no_grad():
                t_out = self.teacher(**features, output_hidden_states=need_hidden, output_attentions=need_attn)
            self.teacher_passes += int(model.training)
        parts: dict[str, torch.Tensor] = {}
        if w["ce"] > 0 and labels is not None:
            parts["ce"] = labelled_cross_entropy(out.logits, labels)
        if w["kd"] > 0:
            parts["kd"] = kd_logits_loss(out.logits, t_out.logits, self.temperature)
        if w["embedding"] > 0:
            parts["embedding"] = embedding_mse_loss(out.hidden_states[0], t_out.hidden_states[0],
                                                    self.projections["embedding"] if "embedding" in self.projections else None, mask)
        if w["hidden"] > 0:
            proj = self.projections["hidden"] if "hidden" in self.projections else None
            parts["hidden"] = torch.stack([
                hidden_mse_loss(out.hidden_states[i + 1], t_out.hidden_states[t + 1], proj, mask)
                for i, t in enumerate(self.layer_map)]).mean()
        if need_attn:
            if not out.attentions or not t_out.attentions:
                raise ValueError("the models returned no attention maps; use attn_implementation='eager'")
            parts["attention"] = torch.stack([
                attention_loss(out.attentions[i], t_out.attentions[t], mask)
                for i, t in enumerate(self.layer_map)]).mean()
        loss = sum(w[k] * v for k, v in parts.items())
        self.last_loss_components = {k: float(v.detach()) for k, v in parts.items()}
        # Only loss and logits go back: hidden states/attentions would end up in eval predictions.
        return loss, SequenceClassifierOutput(loss=loss, logits=out.logits)


# ------------------------------------------------------------------------------------- distill


def with_transfer_texts(train, prepared: PreparedData, tokenizer, max_length: int):
    """``train`` (tokenized) plus the prepared transfer texts, labelled -100 (no hard label)."""
    if prepared.transfer is None or prepared.transfer.empty:
        raise ValueError(
            "distill has transfer: true, but the prepared data has no transfer texts. Set "
            "data.transfer_samples (e.g. null: every training row max_train_samples leaves out) and "
            "rerun the prepare stage, or set transfer: false."
        )
    return with_unlabelled_texts(train, prepared.transfer["text"].tolist(), tokenizer, max_length)


def with_unlabelled_texts(train, texts: list[str], tokenizer, max_length: int):
    """``train`` (tokenized) plus ``texts``, labelled -100: only the teacher's outputs teach them."""
    frame = pd.DataFrame({"text": texts, "label": -100})
    extra = tokenize_frame(frame, tokenizer, max_length).cast(train.features)
    return datasets.concatenate_datasets([train, extra])


def augmented_texts(prepared: PreparedData, step: DistillStep, tokenizer, teacher, seed: int) -> list[str]:
    """TinyBERT's augmentation of the training texts (and the transfer texts, with ``transfer``)."""
    texts = prepared.splits["train"]["text"].tolist()
    if step.transfer and prepared.transfer is not None:
        texts += prepared.transfer["text"].tolist()
    knobs = step.augment
    return augment_texts(texts, tokenizer, teacher.get_input_embeddings().weight, copies=knobs.copies,
                         replace_prob=knobs.replace_prob, neighbours=knobs.neighbours, min_words=knobs.min_words,
                         seed=seed)


def _use_eager_attention(model) -> str:
    old = model.config._attn_implementation
    if old != "eager":
        model.set_attn_implementation("eager")
    return old


def distill(teacher_dir, prepared: PreparedData, step: DistillStep, output_dir, work_dir, *, max_length: int,
            seed: int, student_dir=None, callbacks: list | None = None, train_context=None,
            logits_cache_dir: Path | None = None, distributed: DistributedKnobs | None = None) -> TrainResult:
    """Distill the classifier in ``teacher_dir`` into a smaller student saved at ``output_dir``.

    The student is the teacher cut down to ``step``'s layers, or the model in ``student_dir`` (any
    smaller BERT with the teacher's vocabulary; it gets the teacher's labels and tokenizer).
    Checkpoints go to ``work_dir`` and are removed after saving (no resume: the projections are
    not checkpointed). ``train_context(student)`` wraps training (e.g. fake quantization) and must
    leave a plain model behind when it exits. With prediction-layer losses only, the teacher's
    logits on the training texts are computed once (kept in ``logits_cache_dir`` when given, for
    later calls) instead of on every step. Returns ``TrainResult``; ``history`` is the trainer's
    log history (both stages, in order, when ``two_stage``). ``distributed`` with more than one
    process runs it under torchrun (DDP) and returns what rank 0 reported.
    """
    if ddp.wants_torchrun(distributed):
        refuse_in_process_hooks("distill", callbacks=callbacks, train_context=train_context)
        job = {"teacher_dir": str(teacher_dir), "prepared_dir": stage_prepared_data(prepared, work_dir),
               "step": step.model_dump(mode="json"), "output_dir": str(output_dir), "work_dir": str(work_dir),
               "max_length": max_length, "seed": seed, "student_dir": None if student_dir is None else str(student_dir),
               "logits_cache_dir": None if logits_cache_dir is None else str(logits_cache_dir)}
        return TrainResult.from_json(ddp.run_under_torchrun("distill", job, distributed, Path(work_dir)))
    set_seed(seed)
    device, precision_flags = pick_device_and_precision(step.precision)
    tokenizer = load_tokenizer(teacher_dir, max_length)
    num_labels = len(prepared.label_names)
    teacher = load_classifier_with_labels(teacher_dir)
    if teacher.config.num_labels != num_labels:
        raise ValueError(f"the teacher at {teacher_dir} has {teacher.config.num_labels} labels, the data has {num_labels}")
    student, teacher_layers, layer_map = _make_student(teacher, step, num_labels, student_dir)
    student.config.id2label = dict(enumerate(prepared.label_names))
    student.config.label2id = {n: i for i, n in enumerate(prepared.label_names)}

    uses_attention = step.alpha_attention > 0
    restore_attn = _use_eager_attention(student) if uses_attention else None
    if uses_attention:
        _use_eager_attention(teacher)

    encoded = tokenize_splits(prepared, tokenizer, max_length)
    if step.transfer:
        encoded["train"] = with_transfer_texts(encoded["train"], prepared, tokenizer, max_length)
    augmented = augmented_texts(prepared, step, tokenizer, teacher, seed) if step.augment else []
    if augmented:
        encoded["train"] = with_unlabelled_texts(encoded["train"], augmented, tokenizer, max_length)
        log.info("Augmentation added %d texts for the teacher to label", len(augmented))
    if _prediction_losses_only(step):
        # Every rank computes them; rank 0 alone reads and writes the cache (one writer per file).
        cache = logits_cache_dir if ddp.is_main_process() else None
        logits, reused = cached_teacher_logits(teacher.to(device), content_fingerprint(teacher_dir), encoded["train"],
                                               tokenizer, cache, device)
        encoded["train"] = with_teacher_logits(encoded["train"], logits)
        log.info("Teacher logits for %d training examples %s", len(logits),
                 f"reused from {logits_cache_dir}" if reused else "computed once for every epoch")
    stages = (["intermediate", "prediction"] if step.two_stage else [None])
    work_dir = Path(work_dir)
    if ddp.is_main_process():
        shutil.rmtree(work_dir, ignore_errors=True)
    ddp.barrier()
    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    examples_trained, trained_module, teacher_module, projections = 0, "", "", []
    # The student object stays the same across stages (the Trainer does not copy it).
    with train_context(student) if train_context else contextlib.nullcontext():
        for stage in stages:
            args = training_arguments(step, work_dir / (stage or "single"), seed, precision_flags, device)
            trainer = build_trainer(DistillationTrainer, student, args, encoded, tokenizer, callbacks, teacher=teacher,
                                    weights=step.loss_weights(stage), layer_map=layer_map,
                                    temperature=step.temperature)
            train_output = trainer.train()
            eval_metrics = trainer.evaluate()
            prefix = f"{stage}_" if stage else ""
            metrics.update({f"{prefix}{k}": v for k, v in {**train_output.metrics, **eval_metrics}.items()})
            metrics[f"{prefix}train_teacher_passes"] = trainer.teacher_passes
            history.extend({**h, "stage": stage} if stage else h for h in trainer.state.log_history)
            examples_trained += trainer.examples_trained
            trained_module, teacher_module = type(trainer.model_wrapped).__name__, type(trainer.teacher).__name__
            projections.append(trainer.projections)
            student = trainer.model
    if step.two_stage:  # the headline figures are the final (prediction) stage's
        metrics.update({k[len("prediction_"):]: v for k, v in list(metrics.items()) if k.startswith("prediction_")})
    _check_finite_weights(student)
    summary = ddp.run_summary(examples_trained, trained_module, [student, *projections],
                              teacher_module=teacher_module)
    if restore_attn is not None and restore_attn != "eager":
        student.set_attn_implementation(restore_attn)
    meta = ModelMeta(
        kind="distilled", teacher_dir=str(teacher_dir), teacher_layers=teacher_layers, layer_map=layer_map,
        student_dir=str(student_dir) if student_dir is not None else None,
        distill=step.model_dump(mode="json", exclude={"kind"}), label_names=prepared.label_names,
        data_content_hash=prepared.content_hash, transfer_rows=len(prepared.transfer) if step.transfer else 0,
        augmented_rows=len(augmented),
        max_length=max_length, parameters_before=count_parameters(teacher), parameters_after=count_parameters(student),
        seed=seed, train_metrics=metrics)
    if ddp.is_main_process():
        save_model_folder(student.cpu(), tokenizer, meta, output_dir)
    ddp.barrier()
    if ddp.is_main_process():
        shutil.rmtree(work_dir, ignore_errors=True)
    return TrainResult(Path(output_dir), metrics, history, None, device, summary)


def _prediction_losses_only(step: DistillStep) -> bool:
    """Only ``ce`` and ``kd`` in every stage: the teacher's logits are all it must give."""
    return all(step.loss_weights(None).get(k, 0.0) == 0.0 for k in INTERMEDIATE) and not step.two_stage


def _make_student(teacher, step: DistillStep, num_labels: int, student_dir) -> tuple[Any, list[int] | None, list[int]]:
    """(student, the teacher layers it was cut from or None, the teacher layer each student layer learns from)."""
    n_teacher = teacher.config.num_hidden_layers
    layer_map = list(step.layer_map) if step.layer_map else None
    if student_dir is not None:
        student = load_classifier_with_labels(student_dir, num_labels)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"the student at {student_dir} has vocab_size {student.config.vocab_size}, the teacher "
                             f"{teacher.config.vocab_size}: they must share the teacher's tokenizer")
        return student, None, layer_map or uniform_layer_map(student.config.num_hidden_layers, n_teacher)
    if step.teacher_layers is not None:
        teacher_layers = _check_layers(list(step.teacher_layers), n_teacher, "distill.teacher_layers")
    elif step.student_layers is not None:
        teacher_layers = uniform_layer_map(step.student_layers, n_teacher)
    else:
        raise ValueError("distill needs student_layers or teacher_layers when no earlier step shaped the student")
    return init_student_from_teacher(teacher, teacher_layers), teacher_layers, layer_map or teacher_layers
