"""Knowledge distillation of a BERT classifier into a smaller one (DistilBERT, TinyBERT).

Losses (pure torch, usable on their own):

- ``kd_logits_loss``: soft-target KL at a temperature (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network"; used by DistilBERT, Sanh et al. 2019).
- ``hidden_mse_loss`` / ``embedding_mse_loss`` / ``attention_loss``: intermediate-layer losses of
  TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding").

Students are made from the teacher by keeping some of its encoder layers (DistilBERT's
"every other layer" initialisation, ``init_student_from_teacher``) or loaded from any smaller
BERT folder. ``distill`` trains one with ``DistillationTrainer`` and saves it in the same model
folder format as the teacher (``kind: "distilled"``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import set_seed
from transformers.modeling_outputs import SequenceClassifierOutput

from bertshrink.data import PreparedData
from bertshrink.modeling import count_parameters, save_model_folder
from bertshrink.params import TeacherParams
from bertshrink.training import (
    GuardedTrainer,
    TrainResult,
    _check_finite_weights,
    build_trainer,
    pick_device_and_precision,
    tokenize_frame,
    tokenize_splits,
    training_arguments,
)

INTERMEDIATE = ("hidden", "attention", "embedding")
PREDICTION = ("ce", "kd")


# --------------------------------------------------------------------------------------- losses


def kd_logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Soft-target distillation loss: ``KL(softmax(t/T) || softmax(s/T))``, batchmean, times ``T**2``.

    Hinton et al. (2015); DistilBERT's ``L_ce``. The ``T**2`` factor keeps the gradient scale of
    the soft targets roughly independent of ``T`` so that it can be mixed with the hard-label
    cross-entropy. Computed in float32. The teacher logits are treated as constants (detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows that have a label (``labels >= 0``); 0 when none has.

    Transfer texts carry label -100: a batch of only those has no hard-label loss, not a NaN.
    """
    labelled = labels >= 0
    if not labelled.any():
        return logits.sum() * 0.0  # keeps the graph (and the dtype/device) for backward
    return F.cross_entropy(logits[labelled], labels[labelled])


def _masked_mse(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over ``[batch, seq, dim]``; with a mask, the mean over real tokens only."""
    sq = (a.float() - b.float()) ** 2
    if attention_mask is None:
        return sq.mean()
    mask = attention_mask.to(sq.dtype).unsqueeze(-1)  # [B, L, 1]
    denom = mask.sum() * sq.shape[-1]
    return (sq * mask).sum() / denom.clamp_min(1.0)


def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's hidden-state loss ``MSE(H_s W_h, H_t)`` for one mapped layer pair.

    ``projection`` (``W_h``, an ``nn.Linear(student_width, teacher_width)``) is needed when the widths
    differ; it is learned together with the student. Inputs are ``[batch, seq, width]``. With
    ``attention_mask`` (``[batch, seq]``, 1 for real tokens) the squared error is averaged over real
    tokens (and all dimensions) only, so padding does not count; without it, over everything.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden shapes differ: student {tuple(student_hidden.shape)} vs teacher "
                         f"{tuple(teacher_hidden.shape)}; pass a projection when the widths differ")
    return _masked_mse(student_hidden, teacher_hidden.detach(), attention_mask)


def embedding_mse_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, projection: nn.Module | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's embedding-layer loss ``MSE(E_s W_e, E_t)``: as ``hidden_mse_loss`` on the
    embedding outputs (``hidden_states[0]``), with its own projection ``W_e``."""
    return hidden_mse_loss(student_emb, teacher_emb, projection, attention_mask)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the attention maps ``[batch, heads, q_len, k_len]`` of one mapped layer pair.

    We compare attention *probabilities* (post-softmax), which is what transformers returns with
    ``output_attentions=True`` (eager attention). TinyBERT used the pre-softmax scores, but those
    are not exposed by transformers without patching the attention function, and the
    probabilities carry the same information in a bounded range (no huge values from the
    ``-inf``-like mask), which makes the loss better behaved; the scale of this loss is therefore
    smaller than TinyBERT's, so its weight may need to be larger.

    Head counts must match (no projection exists for heads). With ``attention_mask``
    (``[batch, seq]``), the mean runs over real (query, key) pairs only.
    """
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(f"attention head counts differ: student has {student_attn.shape[1]} heads, "
                         f"teacher has {teacher_attn.shape[1]}; the attention loss needs equal counts")
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"attention shapes differ: student {tuple(student_attn.shape)} vs teacher "
                         f"{tuple(teacher_attn.shape)}")
    sq = (student_attn.float() - teacher_attn.detach().float()) ** 2
    if attention_mask is None:
        return sq.mean()
    m = attention_mask.to(sq.dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]  # [B, 1, Lq, Lk]
    denom = pair.sum() * sq.shape[1]
    return (sq * pair).sum() / denom.clamp_min(1.0)


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


def _encoder(model) -> Any:
    base = getattr(model, model.base_model_prefix, model)
    return base.encoder


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
    encoder = _encoder(student)
    kept = [encoder.layer[i] for i in layers]
    for new_idx, layer in enumerate(kept):  # the cache index each attention uses
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    encoder.layer = nn.ModuleList(kept)
    student.config.num_hidden_layers = len(layers)
    return student


# ------------------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """How to distill. Weights ``alpha_*`` multiply the loss components:

    ``ce`` (hard labels), ``kd`` (soft logits at ``temperature``), ``hidden``, ``attention``,
    ``embedding`` (TinyBERT intermediate losses over ``layer_map``).

    The student is made from the teacher's layers ``teacher_layers`` if given, else from
    ``uniform_layer_map(student_layers, n_teacher)``; ``distill(student_dir=...)`` ignores both.
    ``layer_map`` (teacher layer per student layer, for the intermediate losses) defaults to the
    layers the student was initialised from, or to ``uniform_layer_map`` for a ``student_dir``.
    ``two_stage`` runs TinyBERT's schedule: stage 1 with the intermediate losses only, then stage 2
    with the prediction losses only (``ce`` + ``kd``), each for ``epochs``.
    ``transfer`` adds the prepared transfer texts to the training set: unlabelled, they train on
    the teacher's outputs only (every loss but ``ce``), as DistilBERT's and TinyBERT's transfer sets.
    """

    student_layers: int | None = None
    teacher_layers: list[int] | None = None
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_kd: float = 0.5
    alpha_hidden: float = 0.0
    alpha_attention: float = 0.0
    alpha_embedding: float = 0.0
    layer_map: list[int] | None = None
    two_stage: bool = False
    transfer: bool = False
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    logging_steps: int = 10
    precision: str = "auto"
    seed: int = 42

    def __post_init__(self) -> None:
        def fail(field: str, rule: str) -> None:
            raise ValueError(f"DistillConfig.{field} {rule} (got {getattr(self, field)!r})")

        if self.student_layers is not None and (isinstance(self.student_layers, bool) or not isinstance(self.student_layers, int)
                                                or self.student_layers < 1):
            fail("student_layers", "must be an integer >= 1 or None")
        for name in ("teacher_layers", "layer_map"):
            value = getattr(self, name)
            if value is not None:
                if not value or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
                    fail(name, "must be a non-empty list of layer indices >= 0 or None")
                setattr(self, name, list(value))
        if self.teacher_layers is not None and self.student_layers is not None \
                and len(self.teacher_layers) != self.student_layers:
            fail("student_layers", f"must equal len(teacher_layers)={len(self.teacher_layers)}")
        if not self.temperature > 0:
            fail("temperature", "must be > 0")
        for name in ("alpha_ce", "alpha_kd", "alpha_hidden", "alpha_attention", "alpha_embedding"):
            if not getattr(self, name) >= 0:
                fail(name, "must be >= 0")
        if self.two_stage:
            if self.alpha_hidden + self.alpha_attention + self.alpha_embedding <= 0:
                fail("two_stage", "needs alpha_hidden, alpha_attention or alpha_embedding > 0 for stage 1")
            if self.alpha_ce + self.alpha_kd <= 0:
                fail("two_stage", "needs alpha_ce or alpha_kd > 0 for stage 2")
        elif sum(self.weights().values()) <= 0:
            fail("alpha_ce", "and the other alpha_* are all 0: nothing to train on")
        if not 0 < self.epochs <= 100:
            fail("epochs", "must be in (0, 100]")
        if not 0 < self.learning_rate < 1:
            fail("learning_rate", "must be in (0, 1)")
        for name in ("batch_size", "eval_batch_size", "logging_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        if not 8 <= self.max_length <= 4096:
            fail("max_length", "must be in [8, 4096]")
        if not 0 <= self.weight_decay < 1:
            fail("weight_decay", "must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", "must be in [0, 1)")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            fail("precision", "must be one of auto, fp32, fp16, bf16")

    def weights(self, stage: str | None = None) -> dict[str, float]:
        """Loss weights; ``stage`` 'intermediate' or 'prediction' zeroes the other group."""
        w = {"ce": self.alpha_ce, "kd": self.alpha_kd, "hidden": self.alpha_hidden,
             "attention": self.alpha_attention, "embedding": self.alpha_embedding}
        if stage == "intermediate":
            w = {k: (v if k in INTERMEDIATE else 0.0) for k, v in w.items()}
        elif stage == "prediction":
            w = {k: (v if k in PREDICTION else 0.0) for k, v in w.items()}
        return w

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_params(self, model: str = "distill-student") -> TeacherParams:
        """The same TrainingArguments knobs the teacher uses (``training.training_arguments``)."""
        return TeacherParams(model=model, max_length=self.max_length, epochs=self.epochs, batch_size=self.batch_size,
                             eval_batch_size=self.eval_batch_size, learning_rate=self.learning_rate,
                             weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                             logging_steps=self.logging_steps, save_steps=10**9, precision=self.precision,
                             resume=False)


# ------------------------------------------------------------------------------------- trainer


class DistillationTrainer(GuardedTrainer):
    """Trains the student (``model``) against a frozen ``teacher``.

    ``weights`` maps 'ce', 'kd', 'hidden', 'attention', 'embedding' to loss weights; ``layer_map``
    gives the teacher layer for each student layer. Projections (``W_h`` for hidden states,
    ``W_e`` for embeddings, TinyBERT) are made when widths differ; they live in
    ``self.projections``, outside the student, so they are trained (added to the optimizer) but
    never saved with it. The last step's weighted-out components are in ``last_loss_components``.
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
        if s_cfg.hidden_size != t_cfg.hidden_size:
            if self.weights["hidden"] > 0:
                self.projections["hidden"] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size)
            if self.weights["embedding"] > 0:
                self.projections["embedding"] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size)
        self.projections.to(self.args.device)
        self.last_loss_components: dict[str, float] = {}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        present = {id(q) for group in optimizer.param_groups for q in group["params"]}
        params = [p for p in self.projections.parameters() if p.requires_grad and id(p) not in present]
        if params:  # before the scheduler is made, so it schedules this group too
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def compute_task_loss(self, model, inputs, num_items_in_batch=None):
        w = self.weights
        need_hidden = w["hidden"] > 0 or w["embedding"] > 0
        need_attn = w["attention"] > 0
        mask = inputs.get("attention_mask")
        if self.projections.training != model.training:
            self.projections.train(model.training)
        labels = inputs.get("labels")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        out = model(**features, output_hidden_states=need_hidden, output_attentions=need_attn)
        with torch.no_grad():
            t_out = self.teacher(**features, output_hidden_states=need_hidden, output_attentions=need_attn)
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


def _load_classifier(folder, num_labels: int | None = None):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from bertshrink.structure import is_restructured, load_classifier

    if is_restructured(AutoConfig.from_pretrained(str(folder))):
        return load_classifier(folder)  # head/FFN-pruned: rebuilt from its recorded shapes
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        return AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def with_transfer_texts(train, prepared: PreparedData, tokenizer, max_length: int):
    """``train`` (tokenized) plus the prepared transfer texts, labelled -100 (no hard label)."""
    import datasets

    from bertshrink.data import TRANSFER

    if prepared.transfer is None or prepared.transfer.empty:
        raise ValueError(
            "distill has transfer: true, but the prepared data has no transfer texts. Set "
            "data.transfer_samples (e.g. null: every training row max_train_samples leaves out) and "
            "rerun the prepare stage, or set transfer: false."
        )
    frame = prepared.transfer[["text"]].assign(label=-100)
    transfer = tokenize_frame(frame, tokenizer, max_length).cast(train.features)
    return datasets.concatenate_datasets([train, transfer])


def _use_eager_attention(model) -> str:
    old = model.config._attn_implementation
    if old != "eager":
        model.set_attn_implementation("eager")
    return old


def distill(teacher_dir, prepared: PreparedData, config: DistillConfig, output_dir, work_dir,
            student_dir=None, callbacks: list | None = None, train_context=None) -> TrainResult:
    """Distill the classifier in ``teacher_dir`` into a smaller student saved at ``output_dir``.

    The student is the teacher cut down to ``config`` layers, or the model in ``student_dir`` (any
    smaller BERT with the teacher's vocabulary; it gets the teacher's labels and tokenizer).
    Checkpoints go to ``work_dir`` and are removed after saving (no resume: the projections are
    not checkpointed). ``train_context(student)`` wraps training (e.g. fake quantization) and must
    leave a plain model behind when it exits. Returns ``TrainResult``; ``history`` is the trainer's log history (both
    stages, in order, when ``two_stage``).
    """
    from transformers import AutoTokenizer

    set_seed(config.seed)
    device, precision_flags = pick_device_and_precision(config.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    tokenizer.model_max_length = config.max_length
    num_labels = len(prepared.label_names)
    teacher = _load_classifier(teacher_dir)
    if teacher.config.num_labels != num_labels:
        raise ValueError(f"the teacher at {teacher_dir} has {teacher.config.num_labels} labels, the data has {num_labels}")
    n_teacher = teacher.config.num_hidden_layers

    if student_dir is not None:
        student = _load_classifier(student_dir, num_labels)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"the student at {student_dir} has vocab_size {student.config.vocab_size}, the teacher "
                             f"{teacher.config.vocab_size}: they must share the teacher's tokenizer")
        teacher_layers = None
        layer_map = config.layer_map or uniform_layer_map(student.config.num_hidden_layers, n_teacher)
    else:
        if config.teacher_layers is not None:
            teacher_layers = _check_layers(config.teacher_layers, n_teacher, "DistillConfig.teacher_layers")
        elif config.student_layers is not None:
            teacher_layers = uniform_layer_map(config.student_layers, n_teacher)
        else:
            raise ValueError("DistillConfig.student_layers or teacher_layers is needed (or pass student_dir)")
        student = init_student_from_teacher(teacher, teacher_layers)
        layer_map = config.layer_map or teacher_layers
    student.config.id2label = dict(enumerate(prepared.label_names))
    student.config.label2id = {n: i for i, n in enumerate(prepared.label_names)}

    uses_attention = config.alpha_attention > 0
    restore_attn = _use_eager_attention(student) if uses_attention else None
    if uses_attention:
        _use_eager_attention(teacher)

    encoded = tokenize_splits(prepared, tokenizer, config.max_length)
    if config.transfer:
        encoded["train"] = with_transfer_texts(encoded["train"], prepared, tokenizer, config.max_length)
    stages = (["intermediate", "prediction"] if config.two_stage else [None])
    work_dir = Path(work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    # The student object stays the same across stages (the Trainer does not copy it).
    with train_context(student) if train_context else contextlib.nullcontext():
        for stage in stages:
            stage_dir = work_dir / (stage or "single")
            args = training_arguments(config.training_params(str(teacher_dir)), stage_dir, config.seed, precision_flags, device)
            trainer = build_trainer(
                DistillationTrainer, student, args, encoded, tokenizer, callbacks,
                teacher=teacher,
                weights=config.weights(stage),
                layer_map=layer_map,
                temperature=config.temperature,
            )
            train_output = trainer.train()
            eval_metrics = trainer.evaluate()
            prefix = f"{stage}_" if stage else ""
            metrics.update({f"{prefix}{k}": v for k, v in {**train_output.metrics, **eval_metrics}.items()})
            history.extend({**h, "stage": stage} if stage else h for h in trainer.state.log_history)
            student = trainer.model
    if config.two_stage:  # the headline figures are the final (prediction) stage's
        metrics.update({k[len("prediction_"):]: v for k, v in list(metrics.items()) if k.startswith("prediction_")})
    _check_finite_weights(student)
    if restore_attn is not None and restore_attn != "eager":
        student.set_attn_implementation(restore_attn)
    meta = {
        "kind": "distilled",
        "teacher_dir": str(teacher_dir),
        "teacher_layers": teacher_layers,
        "layer_map": layer_map,
        "student_dir": str(student_dir) if student_dir is not None else None,
        "distill": config.to_dict(),
        "label_names": prepared.label_names,
        "data_content_hash": prepared.content_hash,
        "transfer_rows": len(prepared.transfer) if config.transfer else 0,
        "max_length": config.max_length,
        "parameters_before": count_parameters(teacher),
        "parameters_after": count_parameters(student),
        "seed": config.seed,
        "train_metrics": metrics,
    }
    save_model_folder(student.cpu(), tokenizer, meta, output_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    return TrainResult(Path(output_dir), metrics, history, None, device)
