"""Compression recipes: named, ordered lists of typed steps (``params.yaml`` ``compress:``).

In YAML a step is a one-key mapping, ``- prune_heads: {ratio: 0.5}``; it is parsed into the typed
model of that step, so an unknown step, an unknown key or an impossible number fails at params
time with the recipe and the step named. Checks that need the teacher's shape (dropping every
layer, pruning every head) are in ``check_against_teacher``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillStep(_Step):
    """Knowledge distillation (DistilBERT logits; TinyBERT hidden states, attention, embeddings)."""

    kind: Literal["distill"] = "distill"
    student_layers: int | None = Field(None, ge=1, le=48)
    teacher_layers: tuple[int, ...] | None = None
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    alpha_ce: float = Field(0.5, ge=0.0)
    alpha_kd: float = Field(0.5, ge=0.0)
    alpha_hidden: float = Field(0.0, ge=0.0)
    alpha_attention: float = Field(0.0, ge=0.0)
    alpha_embedding: float = Field(0.0, ge=0.0)
    two_stage: bool = False
    epochs: float = Field(2.0, gt=0.0, le=100.0)
    learning_rate: float = Field(1e-4, gt=0.0, lt=1.0)
    batch_size: int = Field(16, ge=1, le=4096)

    @model_validator(mode="after")
    def _some_loss_and_one_student_shape(self) -> "DistillStep":
        weights = (self.alpha_ce, self.alpha_kd, self.alpha_hidden, self.alpha_attention, self.alpha_embedding)
        if sum(weights) <= 0:
            raise ValueError("at least one of alpha_ce, alpha_kd, alpha_hidden, alpha_attention, alpha_embedding must be > 0")
        if self.student_layers is not None and self.teacher_layers is not None:
            raise ValueError("give student_layers or teacher_layers, not both")
        if self.teacher_layers is not None and len(set(self.teacher_layers)) != len(self.teacher_layers):
            raise ValueError(f"teacher_layers has repeats: {list(self.teacher_layers)}")
        return self


class FinetuneStep(_Step):
    """Plain fine-tuning on labels, e.g. to recover accuracy after pruning."""

    kind: Literal["finetune"] = "finetune"
    epochs: float = Field(1.0, gt=0.0, le=100.0)
    learning_rate: float = Field(5e-5, gt=0.0, lt=1.0)
    batch_size: int = Field(16, ge=1, le=4096)


class DropLayersStep(_Step):
    """Remove whole encoder layers ("Poor Man's BERT")."""

    kind: Literal["drop_layers"] = "drop_layers"
    strategy: Literal["top", "bottom", "alternate", "symmetric", "explicit"] = "top"
    n_drop: int | None = Field(None, ge=1)
    layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _count_or_list(self) -> "DropLayersStep":
        if self.strategy == "explicit" and not self.layers:
            raise ValueError("strategy 'explicit' needs a non-empty `layers` list")
        if self.strategy != "explicit" and self.n_drop is None:
            raise ValueError(f"strategy '{self.strategy}' needs n_drop")
        return self


class PruneHeadsStep(_Step):
    """Remove the least important attention heads (Michel et al., 2019)."""

    kind: Literal["prune_heads"] = "prune_heads"
    ratio: float | None = Field(None, gt=0.0, lt=1.0)
    count: int | None = Field(None, ge=1)
    scope: Literal["global", "per_layer"] = "global"
    importance_batches: int = Field(8, ge=1, le=10_000)

    @model_validator(mode="after")
    def _ratio_or_count(self) -> "PruneHeadsStep":
        if (self.ratio is None) == (self.count is None):
            raise ValueError("give exactly one of ratio (0 < ratio < 1) or count")
        return self


class PruneFfnStep(_Step):
    """Shrink the feed-forward blocks to the most important neurons."""

    kind: Literal["prune_ffn"] = "prune_ffn"
    ratio: float = Field(0.5, gt=0.0, lt=1.0)


class PruneVocabStep(_Step):
    """Keep only the WordPiece ids the task corpus uses (TextPruner)."""

    kind: Literal["prune_vocab"] = "prune_vocab"
    keep_tokens: tuple[str, ...] = ()


class FactorizeEmbeddingsStep(_Step):
    """ALBERT-style low-rank word embeddings: [vocab, hidden] -> [vocab, rank] @ [rank, hidden]."""

    kind: Literal["factorize_embeddings"] = "factorize_embeddings"
    rank: int = Field(128, ge=1, le=65_536)


class MagnitudeStep(_Step):
    """Global unstructured magnitude pruning (sparsity only; dense kernels get no speedup)."""

    kind: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(0.5, gt=0.0, lt=1.0)


STEP_TYPES = (DistillStep, FinetuneStep, DropLayersStep, PruneHeadsStep, PruneFfnStep, PruneVocabStep,
              FactorizeEmbeddingsStep, MagnitudeStep)
STEP_NAMES = tuple(t.model_fields["kind"].default for t in STEP_TYPES)
Step = Annotated[Union[STEP_TYPES], Field(discriminator="kind")]  # noqa: UP007


def _tag_step(raw: Any) -> Any:
    """``{"prune_heads": {...}}`` -> ``{"kind": "prune_heads", ...}`` for the discriminated union."""
    if isinstance(raw, str):
        raw = {raw: {}}
    if isinstance(raw, dict) and "kind" not in raw:
        if len(raw) != 1:
            raise ValueError(f"a step is a one-key mapping like `- distill: {{...}}`, got keys {sorted(raw)}")
        (name, values), = raw.items()
        if name not in STEP_NAMES:
            raise ValueError(f"unknown step '{name}'; known steps: {', '.join(STEP_NAMES)}")
        return {"kind": name, **(values or {})}
    return raw


class Recipe(BaseModel):
    """An ordered list of steps producing one candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: tuple[Step, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _step_order(self) -> "Recipe":
        _vocab_pruning_before_training(self.steps)
        _factorization_last_of_embedding_edits(self.steps)
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            raw = {"steps": raw}
        if isinstance(raw, dict) and isinstance(raw.get("steps"), list):
            raw = {**raw, "steps": [_tag_step(step) for step in raw["steps"]]}
        return raw


def _vocab_pruning_before_training(steps) -> None:
    """Distillation and fine-tuning read with the teacher's vocabulary, so pruning it must come last."""
    kinds = [step.kind for step in steps]
    if "prune_vocab" in kinds and any(k in ("distill", "finetune") for k in kinds[kinds.index("prune_vocab"):]):
        raise ValueError("put prune_vocab after distill/finetune: the teacher reads the full vocabulary, and "
                         "prune_vocab is lossless for the training corpus, so nothing is lost by doing it last")


def _factorization_last_of_embedding_edits(steps) -> None:
    """prune_vocab edits the full embedding matrix, which factorization replaces; only once, too."""
    kinds = [step.kind for step in steps]
    if kinds.count("factorize_embeddings") > 1:
        raise ValueError("factorize_embeddings appears twice; the embeddings can be factorised once")
    if "factorize_embeddings" in kinds and "prune_vocab" in kinds[kinds.index("factorize_embeddings"):]:
        raise ValueError("put prune_vocab before factorize_embeddings: it edits the full embedding matrix")


# MLflow reserves "latest" and v<N>; champion/challenger are the promotion aliases.
RESERVED_ALIASES = ("latest", "champion", "challenger")


class CompressParams(BaseModel):
    """The ``compress`` section: recipe name -> recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipes: dict[str, Recipe] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_are_folder_safe(self) -> "CompressParams":
        for name in self.recipes:
            if name == "teacher":
                raise ValueError("a recipe cannot be named 'teacher' (that name is the teacher's metrics and folder)")
            if name.lower() in RESERVED_ALIASES or re.fullmatch(r"[vV]\d+", name):
                raise ValueError(f"recipe name '{name}' is reserved: the recipe name becomes its MLflow alias, and "
                                 f"{', '.join(RESERVED_ALIASES)} and v<number> mean something else there")
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"recipe name '{name}' must be letters, digits, '-' or '_' (it names a folder)")
        return self


def check_against_teacher(recipes: CompressParams, num_layers: int, num_heads: int,
                          hidden_size: int | None = None) -> list[str]:
    """Problems that need the teacher's shape, as ``recipe[step].kind: message`` lines."""
    problems = []
    for name, recipe in recipes.recipes.items():
        layers, heads = num_layers, num_heads * num_layers
        for i, step in enumerate(recipe.steps):
            where = f"compress.recipes.{name}[{i}].{step.kind}"
            if isinstance(step, DropLayersStep):
                dropped = len(set(step.layers)) if step.layers else step.n_drop
                bad = [l for l in (step.layers or ()) if not 0 <= l < layers]
                if bad:
                    problems.append(f"{where}: layers {bad} outside 0..{layers - 1}")
                if dropped >= layers:
                    problems.append(f"{where}: drops {dropped} of {layers} layers; at least one must remain")
                layers -= min(dropped, layers - 1)
                heads = num_heads * layers
            elif isinstance(step, PruneHeadsStep) and step.count is not None and step.count >= heads - layers + 1:
                problems.append(f"{where}: count {step.count} leaves fewer than one head per layer ({heads} heads in {layers} layers)")
            elif isinstance(step, FactorizeEmbeddingsStep) and hidden_size and step.rank >= hidden_size:
                problems.append(f"{where}: rank {step.rank} >= hidden size {hidden_size} saves nothing; "
                                f"use a rank below {hidden_size} (ALBERT uses 128 for 768)")
            elif isinstance(step, DistillStep):
                if step.student_layers is not None and step.student_layers > layers:
                    problems.append(f"{where}: student_layers {step.student_layers} > the {layers} layers available")
                bad = [l for l in (step.teacher_layers or ()) if not 0 <= l < layers]
                if bad:
                    problems.append(f"{where}: teacher_layers {bad} outside 0..{layers - 1}")
                layers = step.student_layers or (len(step.teacher_layers) if step.teacher_layers else layers)
                heads = num_heads * layers
    return problems


def check_against_config(recipes: CompressParams, config: dict) -> list[str]:
    """``check_against_teacher`` with the shape read from a ``config.json`` dict."""
    return check_against_teacher(recipes, config["num_hidden_layers"], config["num_attention_heads"],
                                 config.get("hidden_size"))
