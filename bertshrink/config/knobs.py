"""Knobs shared by several sections, each declared once and composed where it is needed.

``TrainingKnobs`` is how anything trains (the teacher, and the finetune, distill, qat and
quant_noise steps): the subset of transformers' ``TrainingArguments`` we expose. ``KdLossKnobs``
is the soft-target loss shared by distillation and distilling quantization-aware steps.
``PromotionConstraints`` are the promotion rule's limits (the ``registry`` section composes them).

Sections that want other defaults (a recovery ``finetune`` step trains one epoch at a lower rate)
say so in ``DEFAULTS``; the fields, types and ranges stay the ones declared here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class Knobs(BaseModel):
    """Base of every section and step: unknown keys are errors, values are frozen.

    A section that composes shared knobs but wants other defaults says so in ``DEFAULTS``
    (e.g. ``{"epochs": 1.0}``); the fields, types and ranges stay the ones declared once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _section_defaults(cls, data: Any) -> Any:
        if cls.DEFAULTS and isinstance(data, dict):
            return {**cls.DEFAULTS, **data}
        return data


class TrainingKnobs(Knobs):
    """How a model trains; ``auto`` precision = bf16/fp16 on GPU, fp32 on CPU."""

    epochs: float = Field(2.0, gt=0.0, le=100.0)
    learning_rate: float = Field(1e-4, gt=0.0, lt=1.0)    # small encoders (MiniLM) want more than BERT-base's 2e-5
    batch_size: int = Field(16, ge=1, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)
    weight_decay: float = Field(0.01, ge=0.0, lt=1.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    logging_steps: int = Field(10, ge=1)
    precision: Precision = "auto"
    # Batches of similar lengths pad less (transformers' LengthGroupedSampler: random mega-batches of 50
    # batches, each sorted by length). It pays on many short, varied texts like SST-2's, hardly on texts
    # truncated to max_length; on a few hundred rows one mega-batch is the whole set, every epoch runs
    # longest to shortest, and accuracy suffers (the toy corpus of the tests: 0.67 instead of >= 0.8).
    group_by_length: bool = False

    def training_knobs(self) -> "TrainingKnobs":
        """Just the training knobs of this section or step (what ``TrainingArguments`` is built from)."""
        return TrainingKnobs(**{name: getattr(self, name) for name in TrainingKnobs.model_fields})


class KdLossKnobs(Knobs):
    """Hard-label cross-entropy and soft-target KL at a temperature (Hinton et al.; DistilBERT)."""

    temperature: float = Field(2.0, gt=0.0, le=100.0)
    alpha_ce: float = Field(0.5, ge=0.0)
    alpha_kd: float = Field(0.5, ge=0.0)


# What the rule calls the retention figure it judges, by ``PromotionConstraints.retention_bound``.
JUDGED_RETENTION_WORDS = {"point": "retention", "lower": "retention's 95% lower bound"}


class PromotionConstraints(Knobs):
    """Limits every model the promotion rule may choose meets; None = no limit."""

    min_retention: float | None = Field(None, ge=0.0, le=2.0)   # of the teacher's validation accuracy
    min_agreement: float | None = Field(None, ge=0.0, le=1.0)   # share of validation predictions equal to the teacher's
    max_p95_ms: float | None = Field(None, gt=0.0)              # batch-1 p95 latency
    max_size_mb: float | None = Field(None, gt=0.0)             # size on disk, MB (1e6 bytes)
    # What min_retention judges: the point estimate, or the lower end of its paired bootstrap 95% interval
    # (on a validation split of n texts, a candidate that disagrees with the teacher on a share d of them has
    # an interval of about +-2*sqrt(d/n): 1,000 texts and d = 10% give +-1.9 points).
    retention_bound: Literal["point", "lower"] = "point"

    def judged_retention(self, point: float | None, low: float | None) -> float | None:
        """The retention figure min_retention is compared with."""
        return low if self.retention_bound == "lower" else point

    def constraints(self) -> "PromotionConstraints":
        """Just the constraints of this section."""
        return PromotionConstraints(**{name: getattr(self, name) for name in PromotionConstraints.model_fields})


class DistributedKnobs(Knobs):
    """Data-parallel (DDP) training of the teacher and of distill steps on one machine.

    ``processes`` 1 trains in the calling process, as before. N > 1 starts
    ``torchrun --standalone --nproc_per_node N`` (one process per GPU, or N CPU processes): each
    trains on its shard of every batch, gradients are averaged, and rank 0 alone writes the model.
    ``backend`` auto = nccl when CUDA is present, gloo on CPU. Note that the batch each optimizer
    step sees grows N-fold (``batch_size`` is per process).
    """

    processes: int = Field(1, ge=1, le=64)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
