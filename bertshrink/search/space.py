"""The search space: what a trial chooses, and the recipe those choices make.

A trial's choices become a list of existing recipe steps (``config.recipes``), the same YAML a user
could paste under ``compress.recipes``. Each dimension is one entry of ``DIMENSIONS``: how it reads
its choices from ``search.space`` and what it sets in the recipe draft. Adding a dimension (per-layer
mixed precision, for instance) is one more entry; a dimension that brings a new step kind also names
that step's place in ``STEP_ORDER``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import yaml

from bertshrink.config.recipes import CompressParams, check_against_teacher
from bertshrink.config.search import SearchSpace
from bertshrink.modelfolder.families import Family, Shape

# Where each step goes in a recipe: structure first, then distillation repairs it, then the lossless
# vocabulary cut (after distill: the teacher reads the full vocabulary), then export and quantization.
STEP_ORDER = ("drop_layers", "prune_heads", "prune_ffn", "factorize_embeddings", "distill", "prune_vocab",
              "export_onnx", "quantize", "mixed_precision")
SHAPING_STEPS = ("drop_layers", "prune_heads", "prune_ffn", "factorize_embeddings")
# Categorical choices must be plain values for Optuna's storage: op-type lists travel as "A,B".
LIST_SEPARATOR = ","


class Suggester(Protocol):
    """What a dimension asks of a trial: Optuna's ``Trial`` has these methods."""

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class SpaceContext:
    """What the choices depend on besides ``search.space``: the teacher's shape, and the data."""

    shape: Shape
    transfer_available: bool = False
    family: Family | None = None


@dataclass
class RecipeDraft:
    """Steps being assembled: step kind -> its options; ``epochs`` is the full budget's."""

    steps: dict[str, dict] = field(default_factory=dict)

    def set(self, kind: str, **options: Any) -> None:
        self.steps.setdefault(kind, {}).update(options)

    def drop(self, kind: str) -> None:
        self.steps.pop(kind, None)

    def recipe(self, distill_epochs: float | None = None) -> list:
        """The steps in ``STEP_ORDER`` as recipe YAML (a bare name for a step without options);
        ``distill_epochs`` replaces the distillation's epochs (the proxy's short budget)."""
        out = []
        for kind in STEP_ORDER:
            if kind not in self.steps:
                continue
            options = dict(self.steps[kind])
            if kind == "distill" and distill_epochs is not None:
                options["epochs"] = distill_epochs
            out.append({kind: options} if options else kind)
        return out


@dataclass(frozen=True)
class Dimension:
    """One axis of the space: ``choices`` from the space's bounds, ``apply`` the chosen value to the
    draft; ``active`` says whether it matters given the values chosen so far (else not suggested)."""

    name: str
    choices: Callable[[SearchSpace, SpaceContext], tuple]
    apply: Callable[[Any, RecipeDraft, dict, SpaceContext], None]
    active: Callable[[dict, SpaceContext], bool] = lambda values, ctx: True
    integer_range: bool = False   # choices are (low, high) of an integer


# ---------------------------------------------------------------- the dimensions


def layers_kept(n_keep: int, how: str, n_layers: int) -> list[int]:
    """Indices of the teacher layers a student of ``n_keep`` layers keeps."""
    if n_keep >= n_layers:
        return list(range(n_layers))
    if how == "bottom":
        return list(range(n_keep))
    if how == "top":
        return list(range(n_layers - n_keep, n_layers))
    # spread: evenly over the stack, always keeping the last layer (the classifier reads it)
    step = n_layers / n_keep
    return sorted({n_layers - 1 - int(i * step) for i in range(n_keep)})


def _layer_range(space: SearchSpace, ctx: SpaceContext) -> tuple[int, int]:
    top = ctx.shape.layers
    return min(space.layers[0], top), min(space.layers[1], top)


def _apply_layers(value: int, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    kept = layers_kept(value, values.get("layer_choice", "spread"), ctx.shape.layers)
    dropped = [i for i in range(ctx.shape.layers) if i not in kept]
    if dropped:
        draft.set("drop_layers", strategy="explicit", layers=dropped)


def _apply_ratio(kind: str) -> Callable:
    def apply(value: float, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
        if value > 0:
            draft.set(kind, ratio=value)
    return apply


def _apply_rank(value: int | None, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    if value is not None:
        draft.set("factorize_embeddings", rank=value)


def _apply_vocab(value: bool, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    if value:
        draft.set("prune_vocab")


def _distill_option(key: str, skip_zero: bool = False) -> Callable:
    def apply(value: Any, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
        draft.set("distill")
        if not (skip_zero and not value):
            draft.set("distill", **{key: value})
    return apply


def _apply_quantize(value: str, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    if value == "none":
        return
    draft.set("export_onnx")
    if value == "mixed":   # per-layer precision: its bits are the precision_bits dimension
        draft.set("mixed_precision")
        return
    draft.set("quantize", backend="onnxruntime", mode=value)
    if value == "static":
        draft.set("quantize", calibration={"split": "train", "rows": 256, "method": "minmax"})


def _apply_precision_bits(value: float, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    draft.set("mixed_precision", bits=value)


def _mixed(values: dict, ctx: SpaceContext) -> bool:
    return values.get("quantize") == "mixed"


def _apply_calibration_rows(value: int, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    draft.steps["quantize"]["calibration"]["rows"] = value


def _apply_keep_fp32(value: str, draft: RecipeDraft, values: dict, ctx: SpaceContext) -> None:
    if value:
        draft.set("quantize", keep_fp32=value.split(LIST_SEPARATOR))


def _static(values: dict, ctx: SpaceContext) -> bool:
    return values.get("quantize") == "static"


def _ranks(space: SearchSpace, ctx: SpaceContext) -> tuple:
    # A rank at or above the embedding width saves nothing (check_against_teacher refuses it).
    return tuple(r for r in space.embedding_rank if r is None or r < ctx.shape.embedding_width) or (None,)


DIMENSIONS: tuple[Dimension, ...] = (
    # layer_choice before layers: _apply_layers reads it.
    Dimension("layer_choice", lambda s, c: s.layer_choice, lambda *a: None),
    Dimension("layers", _layer_range, _apply_layers, integer_range=True),
    Dimension("head_ratio", lambda s, c: s.head_ratio, _apply_ratio("prune_heads")),
    Dimension("ffn_ratio", lambda s, c: s.ffn_ratio, _apply_ratio("prune_ffn")),
    Dimension("embedding_rank", _ranks, _apply_rank),
    Dimension("alpha_hidden", lambda s, c: s.alpha_hidden, _distill_option("alpha_hidden", skip_zero=True)),
    Dimension("alpha_attention", lambda s, c: s.alpha_attention, _distill_option("alpha_attention", skip_zero=True)),
    Dimension("temperature", lambda s, c: s.temperature, _distill_option("temperature")),
    Dimension("learning_rate", lambda s, c: s.learning_rate, _distill_option("learning_rate")),
    Dimension("epochs", lambda s, c: s.epochs, _distill_option("epochs")),
    Dimension("transfer", lambda s, c: s.transfer if c.transfer_available else (False,),
              _distill_option("transfer", skip_zero=True)),
    Dimension("group_by_length", lambda s, c: s.group_by_length, _distill_option("group_by_length", skip_zero=True)),
    Dimension("prune_vocab", lambda s, c: s.prune_vocab, _apply_vocab),
    Dimension("quantize", lambda s, c: s.quantize, _apply_quantize),
    Dimension("precision_bits", lambda s, c: s.precision_bits, _apply_precision_bits, _mixed),
    Dimension("calibration_rows", lambda s, c: s.calibration_rows, _apply_calibration_rows, _static),
    Dimension("keep_fp32", lambda s, c: tuple(LIST_SEPARATOR.join(ops) for ops in s.keep_fp32),
              _apply_keep_fp32, _static),
)


# ---------------------------------------------------------------- trials -> recipes


def suggest(trial: Suggester, space: SearchSpace, ctx: SpaceContext) -> dict[str, Any]:
    """Ask ``trial`` for a value of every active dimension; returns ``name -> value``."""
    values: dict[str, Any] = {}
    for dim in DIMENSIONS:
        if not dim.active(values, ctx):
            continue
        choices = dim.choices(space, ctx)
        if dim.integer_range:
            values[dim.name] = trial.suggest_int(dim.name, *choices)
        else:
            values[dim.name] = trial.suggest_categorical(dim.name, list(choices))
    return values


def draft_of(values: dict[str, Any], ctx: SpaceContext) -> RecipeDraft:
    """The recipe draft that ``values`` (a trial's params) make."""
    draft = RecipeDraft()
    draft.set("distill")  # every student is trained: distillation repairs what the other steps cut
    for dim in DIMENSIONS:
        if dim.name in values and dim.active(values, ctx):   # values of an inactive dimension are ignored
            dim.apply(values[dim.name], draft, values, ctx)
    if not any(kind in draft.steps for kind in SHAPING_STEPS):
        # distill cuts its student from the teacher when no step shaped one: here, every layer
        draft.set("distill", student_layers=ctx.shape.layers)
    return draft


def recipe_steps(values: dict[str, Any], ctx: SpaceContext, distill_epochs: float | None = None) -> list:
    """A trial's recipe as YAML steps; ``distill_epochs`` for the proxy's short budget."""
    return draft_of(values, ctx).recipe(distill_epochs)


def recipe_yaml(name: str, steps: list) -> str:
    """``name: [steps]`` as YAML to paste under ``compress.recipes`` in params.yaml."""
    return yaml.safe_dump({name: steps}, sort_keys=False, default_flow_style=None)


def recipe_problems(name: str, steps: list, ctx: SpaceContext) -> list[str]:
    """What the params loader and the teacher's shape check would say of this recipe (empty: fine)."""
    try:
        recipes = CompressParams(recipes={name: steps})
    except ValueError as err:
        return [str(err)]
    shape = ctx.shape
    return check_against_teacher(recipes, shape.layers, shape.heads, shape.embedding_width, ctx.family,
                                 shape.weight_layers)
