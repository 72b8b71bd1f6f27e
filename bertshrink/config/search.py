"""The ``search`` section: the automatic compression-recipe search (``python -m flows.search``).

The space's dimensions are lists of choices (one choice = fixed), except ``layers``, a range. The
constraints are not declared here: the search reads the ``registry`` section's promotion rule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bertshrink.config.knobs import Knobs
from bertshrink.config.recipes import MIN_CALIBRATION_ROWS

LayerChoice = Literal["spread", "bottom", "top"]
QuantChoice = Literal["none", "dynamic", "static", "mixed"]
Sampler = Literal["nsga2", "tpe"]


def _nonempty(name: str, choices: tuple) -> None:
    if not choices:
        raise ValueError(f"space.{name} needs at least one choice")


class SearchSpace(Knobs):
    """The bounds of the search: what a trial may choose."""

    layers: tuple[int, int] = (1, 6)                   # min and max encoder layers kept (capped at the teacher's)
    layer_choice: tuple[LayerChoice, ...] = ("spread", "top")  # which layers: evenly spread, the first or the last
    head_ratio: tuple[float, ...] = (0.0, 0.25, 0.5)    # share of attention heads pruned (0 = none)
    ffn_ratio: tuple[float, ...] = (0.0, 0.25, 0.5)     # share of FFN neurons pruned per layer
    embedding_rank: tuple[int | None, ...] = (None, 128)  # ALBERT factorisation rank; null = keep the embeddings
    prune_vocab: tuple[bool, ...] = (False, True)
    alpha_hidden: tuple[float, ...] = (0.0, 1.0)        # TinyBERT hidden-state loss weight (0 = logits only)
    alpha_attention: tuple[float, ...] = (0.0,)
    temperature: tuple[float, ...] = (2.0,)
    epochs: tuple[float, ...] = (1.0, 2.0)             # distillation epochs of the full budget
    learning_rate: tuple[float, ...] = (1e-4,)
    transfer: tuple[bool, ...] = (False,)               # distil on data.transfer_samples' texts too (if any)
    group_by_length: tuple[bool, ...] = (False,)        # length-grouped batches (2x per epoch on SST-2; see knobs)
    # none = PyTorch fp32; dynamic / static = ONNX int8; mixed = per-layer precision (mixed_precision step)
    quantize: tuple[QuantChoice, ...] = ("none", "dynamic", "static")
    precision_bits: tuple[float, ...] = (6.0, 12.0)     # mixed: average bits per encoder weight (< 8: int4/int8)
    calibration_rows: tuple[int, ...] = (256,)         # static int8: training rows calibrated on
    keep_fp32: tuple[tuple[str, ...], ...] = ((),)      # static int8: op types left fp32, e.g. [SkipLayerNormalization]

    @model_validator(mode="after")
    def _bounds(self) -> "SearchSpace":
        low, high = self.layers
        if not 1 <= low <= high:
            raise ValueError(f"layers must be [min, max] with 1 <= min <= max (got {list(self.layers)})")
        for name in SearchSpace.model_fields:
            if name != "layers":
                _nonempty(name, getattr(self, name))
        for name in ("head_ratio", "ffn_ratio"):
            bad = [r for r in getattr(self, name) if not 0.0 <= r < 1.0]
            if bad:
                raise ValueError(f"{name} choices must be in [0, 1) (got {bad})")
        if any(r is not None and r < 1 for r in self.embedding_rank):
            raise ValueError(f"embedding_rank choices must be >= 1 or null (got {list(self.embedding_rank)})")
        if any(x < 0 for x in self.alpha_hidden + self.alpha_attention):
            raise ValueError("alpha_hidden and alpha_attention choices must be >= 0")
        if any(not 0 < x <= 100 for x in self.epochs + self.temperature):
            raise ValueError("epochs and temperature choices must be in (0, 100]")
        if any(not 0 < x < 1 for x in self.learning_rate):
            raise ValueError(f"learning_rate choices must be in (0, 1) (got {list(self.learning_rate)})")
        if any(not 4.0 <= b <= 32.0 for b in self.precision_bits):
            raise ValueError(f"precision_bits choices must be in [4, 32] (got {list(self.precision_bits)})")
        if any(r < MIN_CALIBRATION_ROWS for r in self.calibration_rows):
            raise ValueError(f"calibration_rows choices must be >= {MIN_CALIBRATION_ROWS}")
        return self


class ProxyBudget(Knobs):
    """How a trial is scored cheaply: a short distillation on a subset of the training rows."""

    train_rows: int | None = Field(512, ge=16)      # seeded, stratified subset; null = all rows
    epochs: float = Field(1.0, gt=0.0, le=100.0)


class SearchParams(Knobs):
    """The search: its budget, its study and its space (constraints: the ``registry`` section's rule)."""

    enabled: bool = False                           # the pipeline runs the search after compress
    study_name: str = Field("bertshrink-search", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Optuna RDB storage: null = SQLite file under checkpoints_dir/search/; or an SQLAlchemy URL such as
    # postgresql+psycopg2://bertshrink@db-host:5432/optuna (the tracking server's PostgreSQL). No password
    # here: the driver reads PGPASSWORD or ~/.pgpass, so params files and their logs never carry one.
    storage: str | None = None
    sampler: Sampler = "nsga2"                      # nsga2 | tpe (both with the registry's constraints)
    budget_minutes: float = Field(60.0, gt=0.0, le=7 * 24 * 60)
    full_share: float = Field(0.4, gt=0.0, lt=1.0)  # share of the budget kept for full-budget training
    max_trials: int = Field(24, ge=1, le=10_000)    # proxy trials in all, counting earlier runs of the study
    eta: int = Field(3, ge=1, le=100)               # successive halving: the top 1/eta of proxy trials go on
    max_full_trials: int = Field(4, ge=1, le=1000)
    max_front_size: int = Field(4, ge=1, le=50)     # front members registered (search-1, search-2, ...)
    latency_iterations: int = Field(10, ge=1, le=1000)  # batch-1 timings per trial (after 2 warm-up)
    proxy: ProxyBudget = ProxyBudget()
    space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _no_password_in_storage(self) -> "SearchParams":
        if self.storage and "@" in self.storage and ":" in self.storage.split("://", 1)[-1].split("@", 1)[0]:
            raise ValueError("storage holds a password: remove it from the URL (user@host) and give it to the driver "
                             "through PGPASSWORD or ~/.pgpass, so it never lands in params files, logs or MLflow")
        return self
