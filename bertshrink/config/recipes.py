"""Compression recipes: named, ordered lists of typed steps (``params.yaml`` ``compress:``).

In YAML a step is a one-key mapping, ``- prune_heads: {ratio: 0.5}``; it is parsed into the typed
model of that step, so an unknown step, an unknown key or an impossible number fails at params
time with the recipe and the step named. Checks that need the teacher's shape (dropping every
layer, pruning every head) are in ``check_against_teacher``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bertshrink.config.knobs import KdLossKnobs, Knobs, TrainingKnobs
from bertshrink.modelfolder.families import Family, family_of, refusal
from bertshrink.modelfolder.files import ORT_BACKEND, TORCH_QUANT_MODES, TorchQuantMode


class _Step(Knobs):
    """Base of every step: a ``kind`` tag, unknown keys refused."""


# A recovery or quantization-aware step trains one epoch at a gentler rate than the teacher.
SHORT_TRAINING = {"epochs": 1.0, "learning_rate": 5e-5}
INTERMEDIATE_LOSSES = ("hidden", "attention", "embedding")
PREDICTION_LOSSES = ("ce", "kd")


class AugmentKnobs(Knobs):
    """TinyBERT's data augmentation (``training/augment.py``): ``copies`` new texts per training text
    of at least ``min_words`` words, each word swapped with probability ``replace_prob`` for one of
    its ``neighbours`` nearest in the teacher's embeddings; the teacher labels them (no ``ce``).
    The paper makes 20 copies with p 0.4 and 15 neighbours; each copy costs a pass over those texts."""

    copies: int = Field(1, ge=1, le=50)
    replace_prob: float = Field(0.4, gt=0.0, le=1.0)
    neighbours: int = Field(15, ge=1, le=1000)
    min_words: int = Field(1, ge=1, le=1000)


class DistillStep(_Step, TrainingKnobs, KdLossKnobs):
    """Knowledge distillation (DistilBERT logits; TinyBERT hidden states, attention, embeddings).

    The student is the current model when a step before this one shaped it, else the teacher cut to
    ``teacher_layers`` (or ``student_layers`` spread uniformly). ``layer_map`` (teacher layer per
    student layer, for the intermediate losses) defaults to the layers the student was cut from.
    ``two_stage``: TinyBERT's schedule, intermediate losses first, then ``ce`` + ``kd``, each for
    ``epochs``. ``transfer``: also train on data.transfer_samples' unlabelled texts, labelled by
    the teacher (every loss but ``ce``). ``augment``: also train on new texts made from the
    training (and, with ``transfer``, transfer) texts by TinyBERT's word swaps, labelled by the teacher.
    """

    kind: Literal["distill"] = "distill"
    student_layers: int | None = Field(None, ge=1, le=48)
    teacher_layers: tuple[int, ...] | None = None
    layer_map: tuple[int, ...] | None = None
    alpha_hidden: float = Field(0.0, ge=0.0)
    alpha_attention: float = Field(0.0, ge=0.0)
    alpha_embedding: float = Field(0.0, ge=0.0)
    two_stage: bool = False
    transfer: bool = False
    augment: AugmentKnobs | None = None

    @model_validator(mode="after")
    def _some_loss_and_one_student_shape(self) -> "DistillStep":
        if self.two_stage:
            if sum(self.loss_weights("intermediate").values()) <= 0:
                raise ValueError("two_stage needs alpha_hidden, alpha_attention or alpha_embedding > 0 for stage 1")
            if sum(self.loss_weights("prediction").values()) <= 0:
                raise ValueError("two_stage needs alpha_ce or alpha_kd > 0 for stage 2")
        elif sum(self.loss_weights().values()) <= 0:
            raise ValueError("at least one of alpha_ce, alpha_kd, alpha_hidden, alpha_attention, alpha_embedding must be > 0")
        if self.student_layers is not None and self.teacher_layers is not None:
            raise ValueError("give student_layers or teacher_layers, not both")
        for name in ("teacher_layers", "layer_map"):
            layers = getattr(self, name)
            if layers is not None and (not layers or min(layers) < 0):
                raise ValueError(f"{name} must be a non-empty list of layer indices >= 0 (got {list(layers)})")
        if self.teacher_layers is not None and len(set(self.teacher_layers)) != len(self.teacher_layers):
            raise ValueError(f"teacher_layers has repeats: {list(self.teacher_layers)}")
        return self

    def loss_weights(self, stage: str | None = None) -> dict[str, float]:
        """Loss weights by component; ``stage`` 'intermediate' or 'prediction' zeroes the other group."""
        weights = {"ce": self.alpha_ce, "kd": self.alpha_kd, "hidden": self.alpha_hidden,
                   "attention": self.alpha_attention, "embedding": self.alpha_embedding}
        keep = {"intermediate": INTERMEDIATE_LOSSES, "prediction": PREDICTION_LOSSES}.get(stage, tuple(weights))
        return {k: (v if k in keep else 0.0) for k, v in weights.items()}


class FinetuneStep(_Step, TrainingKnobs):
    """Plain fine-tuning on labels, e.g. to recover accuracy after pruning."""

    DEFAULTS = SHORT_TRAINING
    kind: Literal["finetune"] = "finetune"


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


class _QuantTrainingStep(_Step, TrainingKnobs, KdLossKnobs):
    """How a quantization-aware training step trains: distillation from the teacher, or labels only."""

    DEFAULTS = SHORT_TRAINING
    method: Literal["distill", "finetune"] = "distill"

    def as_distill_step(self) -> DistillStep:
        """The distillation this step runs (logit KD only) when ``method`` is distill."""
        return DistillStep(**self.training_knobs().model_dump(), temperature=self.temperature,
                           alpha_ce=self.alpha_ce, alpha_kd=self.alpha_kd)


class QatStep(_QuantTrainingStep):
    """Quantization-aware training (Q8BERT): encoder Linear layers train with fake-quantized weights and
    inputs; a later ``export_onnx`` + ``quantize`` makes the real int8 model."""

    kind: Literal["qat"] = "qat"
    bits: Literal[8] = 8
    quantize_activations: bool = True


class QuantNoiseStep(_QuantTrainingStep):
    """Quant-Noise (Fan et al., 2020): each forward pass quantizes a random subset ``p`` of weight blocks."""

    kind: Literal["quant_noise"] = "quant_noise"
    p: float = Field(0.1, gt=0.0, le=1.0)
    block_size: int = Field(8, ge=1, le=4096)
    bits: Literal[4, 8] = 8


class ExportOnnxStep(_Step):
    """Export to ONNX (dynamic batch and sequence), fuse for ONNX Runtime, check parity with PyTorch."""

    kind: Literal["export_onnx"] = "export_onnx"
    opset: int = Field(18, ge=14, le=23)
    optimize: bool = True                      # ONNX Runtime transformer fusions (attention, GELU, LayerNorm)
    atol: float = Field(1e-3, gt=0.0, le=10.0)  # max |logit difference| to PyTorch on validation texts
    min_agreement: float = Field(0.995, gt=0.0, le=1.0)
    parity_rows: int = Field(256, ge=8, le=100_000)


# Fewer rows than this give activation ranges that one odd sentence can decide.
MIN_CALIBRATION_ROWS = 32
EVALUATION_SPLITS = ("validation", "test")
# The rule chooses on validation figures; the test split only reports (choosing on it overstates the choice).
SELECTION_SPLIT = "validation"
REPORTED_SPLIT = "test"
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
QuantFormat = Literal["qdq", "qoperator"]
QUANT_FORMATS: tuple[str, ...] = get_args(QuantFormat)


class Calibration(_Step):
    """Where static quantization reads activation ranges: N rows of a training split, never evaluation rows."""

    split: str = "train"
    rows: int = Field(256, ge=1, le=1_000_000)
    method: CalibrationMethod = "minmax"

    @model_validator(mode="after")
    def _training_rows_enough_of_them(self) -> "Calibration":
        if self.split in EVALUATION_SPLITS:
            raise ValueError(f"calibration split '{self.split}' is an evaluation split: calibrating on it leaks the "
                             "rows accuracy is measured on; use split: train")
        if self.rows < MIN_CALIBRATION_ROWS:
            raise ValueError(f"calibration rows {self.rows} is too small: use at least {MIN_CALIBRATION_ROWS} "
                             "(a few hundred is typical)")
        return self


OrtQuantMode = Literal["dynamic", "static", "int4"]
ORT_QUANT_MODES: tuple[str, ...] = get_args(OrtQuantMode)


class QuantizeStep(_Step):
    """Post-training quantization: ONNX Runtime (after export_onnx) or PyTorch (torchao int8, fp16/bf16)."""

    kind: Literal["quantize"] = "quantize"
    backend: Literal["onnxruntime", "torch"] = ORT_BACKEND
    mode: OrtQuantMode | TorchQuantMode = "dynamic"
    # A scale per output channel: per-tensor dynamic int8 cost SST-2 1.3 points of dev accuracy, per-channel none.
    per_channel: bool = True
    format: QuantFormat = "qdq"
    calibration: Calibration = Calibration()
    # Op types (e.g. SkipLayerNormalization, BiasGelu, Add) or node names left in fp32 (static mode):
    # LayerNorm, GELU and residual Adds are the usual causes of int8 accuracy collapse (optimum #151).
    keep_fp32: tuple[str, ...] = ()
    include_embeddings: bool = True           # quantize the word-embedding Gather too, so the file shrinks
    block_size: int = Field(32, ge=16, le=4096)  # int4 weight blocks

    @model_validator(mode="after")
    def _mode_fits_backend(self) -> "QuantizeStep":
        modes = ORT_QUANT_MODES if self.onnx else TORCH_QUANT_MODES
        if self.mode not in modes:
            raise ValueError(f"mode '{self.mode}' is not a {self.backend} mode; use one of {', '.join(modes)}")
        if self.keep_fp32 and self.mode != "static":
            raise ValueError("keep_fp32 applies to mode: static (dynamic mode quantizes only MatMul/Gather weights)")
        return self

    @property
    def onnx(self) -> bool:
        return self.backend == ORT_BACKEND


# Bits of a weight stored at each precision (int4's block scales are not counted).
PRECISION_BITS = {"fp32": 32, "int8": 8, "int4": 4}
# The precision a layer keeps when it is too sensitive for the low one.
HIGHER_PRECISION = {"int8": "fp32", "int4": "int8"}
SensitivityMethod = Literal["kl", "agreement", "accuracy"]
SENSITIVITY_METHODS: tuple[str, ...] = get_args(SensitivityMethod)
MIN_SENSITIVITY_ROWS = 16


class MixedPrecisionStep(_Step):
    """Per-layer mixed precision (Q-BERT) after export_onnx: each encoder layer alone is quantized to the
    low precision and its harm to the fp32 model's predictions measured on ``rows`` seeded rows of
    ``split``; the most sensitive layers stay at the higher precision (fp32 above int8, int8 above
    int4) while the average bits per encoder weight stay <= ``bits``. ``keep_layers`` names the
    high-precision layers instead (no measurement, no budget)."""

    kind: Literal["mixed_precision"] = "mixed_precision"
    bits: float = Field(16.0, ge=4.0, le=32.0)
    # auto: int4 (with int8 kept layers) when bits < 8, else int8 (with fp32 kept layers).
    low: Literal["auto", "int8", "int4"] = "auto"
    sensitivity: SensitivityMethod = "kl"
    rows: int = Field(128, ge=MIN_SENSITIVITY_ROWS, le=100_000)
    split: Literal["train", "validation"] = "train"  # never the reported test split
    keep_layers: tuple[int, ...] | None = None
    int8: Literal["dynamic", "static"] = "dynamic"
    calibration: Calibration = Calibration()  # int8: static only
    per_channel: bool = True
    include_embeddings: bool = True
    block_size: int = Field(32, ge=16, le=4096)  # int4 weight blocks

    @model_validator(mode="after")
    def _budget_fits_the_precisions(self) -> "MixedPrecisionStep":
        low, high = self.low_precision, self.high_precision
        if self.keep_layers is not None:
            if "bits" in self.model_fields_set:
                raise ValueError("give bits (a budget the step meets) or keep_layers (the layers kept at "
                                 f"{high}), not both")
            if min(self.keep_layers, default=0) < 0 or len(set(self.keep_layers)) != len(self.keep_layers):
                raise ValueError(f"keep_layers must be distinct layer indices >= 0 (got {list(self.keep_layers)})")
        elif not PRECISION_BITS[low] <= self.bits <= PRECISION_BITS[high]:
            raise ValueError(f"bits {self.bits:g} is outside {PRECISION_BITS[low]}..{PRECISION_BITS[high]}, what "
                             f"low: {low} layers (with {high} kept layers) can average; use bits in that range "
                             "or low: auto")
        return self

    @property
    def low_precision(self) -> str:
        if self.low != "auto":
            return self.low
        return "int4" if self.bits < PRECISION_BITS["int8"] else "int8"

    @property
    def high_precision(self) -> str:
        return HIGHER_PRECISION[self.low_precision]


STEP_TYPES = (DistillStep, FinetuneStep, DropLayersStep, PruneHeadsStep, PruneFfnStep, PruneVocabStep,
              FactorizeEmbeddingsStep, MagnitudeStep, QatStep, QuantNoiseStep, ExportOnnxStep, QuantizeStep,
              MixedPrecisionStep)
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
        _factorization_once(self.steps)
        _onnx_steps_last(self.steps)
        _quantization_last(self.steps)
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            raw = {"steps": raw}
        if isinstance(raw, dict) and isinstance(raw.get("steps"), list):
            raw = {**raw, "steps": [_tag_step(step) for step in raw["steps"]]}
        return raw


def _reads_with_teacher_vocabulary(step) -> bool:
    return step.kind == "distill" or (step.kind in ("qat", "quant_noise") and step.method == "distill")


def _vocab_pruning_before_training(steps) -> None:
    """Distillation feeds teacher and student the same token ids, so the vocabulary is pruned after it.

    Fine-tuning reads with the model's own (pruned) tokenizer, which covers every training text, so it
    may follow prune_vocab (e.g. to recover after factorize_embeddings).
    """
    kinds = [step.kind for step in steps]
    if "prune_vocab" in kinds and any(_reads_with_teacher_vocabulary(s) for s in steps[kinds.index("prune_vocab"):]):
        raise ValueError("put prune_vocab after distill (and qat/quant_noise with method: distill): the teacher "
                         "reads the full vocabulary, and prune_vocab is lossless for the training corpus, so "
                         "nothing is lost by doing it last")


PYTORCH_ONLY_STEPS = ("distill", "finetune", "drop_layers", "prune_heads", "prune_ffn", "prune_vocab",
                      "factorize_embeddings", "magnitude", "qat", "quant_noise")


def _onnx_steps_last(steps) -> None:
    """After export_onnx the model is an ONNX graph: only ONNX Runtime quantization can follow."""
    kinds = [step.kind for step in steps]
    if kinds.count("export_onnx") > 1:
        raise ValueError("export_onnx appears twice; a recipe exports once")
    exported_at = kinds.index("export_onnx") if "export_onnx" in kinds else len(kinds)
    for index, step in enumerate(steps):
        if index > exported_at and (step.kind in PYTORCH_ONLY_STEPS or (step.kind == "quantize" and not step.onnx)):
            raise ValueError(f"step {index} ({step.kind}) comes after export_onnx, but it works on PyTorch models; "
                             "move it before export_onnx")
        if step.kind == "quantize" and step.onnx and index < exported_at:
            raise ValueError(f"step {index} (quantize, backend onnxruntime) needs an ONNX model: put export_onnx before it")
        if step.kind == "mixed_precision" and index < exported_at:
            raise ValueError(f"step {index} (mixed_precision) quantizes an ONNX model: put export_onnx before it")


QUANTIZATION_STEPS = ("quantize", "mixed_precision")


def _quantization_last(steps) -> None:
    """A quantized model is not trained or pruned further, and is quantized once."""
    quantize_at = [i for i, step in enumerate(steps) if step.kind in QUANTIZATION_STEPS]
    if len(quantize_at) > 1:
        kinds = sorted({steps[i].kind for i in quantize_at})
        what = f"{kinds[0]} appears twice" if len(kinds) == 1 else f"{' and '.join(kinds)} both quantize"
        raise ValueError(f"{what}; a recipe quantizes once")
    if quantize_at and quantize_at[0] != len(steps) - 1:
        raise ValueError(f"{steps[quantize_at[0]].kind} must be the last step "
                         f"(found {steps[quantize_at[0] + 1].kind} after it)")


def _factorization_once(steps) -> None:
    kinds = [step.kind for step in steps]
    if kinds.count("factorize_embeddings") > 1:
        raise ValueError("factorize_embeddings appears twice; the embeddings can be factorised once")


# MLflow reserves "latest" and v<N>; champion/challenger are the promotion aliases.
RESERVED_ALIASES = ("latest", "champion", "challenger")
# The search's front members are candidates named search-1, search-2, ... (their MLflow aliases too).
SEARCH_PREFIX = "search-"


def recipe_fingerprint(recipe: Recipe) -> str:
    """A short hash of every step and knob of ``recipe``: the registry tells by it whether a recipe
    already ran as it is written now (a changed recipe runs again)."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CompressParams(BaseModel):
    """The ``compress`` section: recipe name -> recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipes: dict[str, Recipe] = Field(default_factory=dict)
    # The standard recipe every candidate is also compared with (ratios in the comparison table).
    baseline: str | None = "baseline-ort-int8"
    # A candidate whose test accuracy falls more than this (absolute) below the teacher's has collapsed:
    # it is kept on disk and tagged for inspection, but not registered as a promotion candidate.
    max_accuracy_drop: float = Field(0.10, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _names_are_folder_safe(self) -> "CompressParams":
        for name in self.recipes:
            if name == "teacher":
                raise ValueError("a recipe cannot be named 'teacher' (that name is the teacher's metrics and folder)")
            if name.lower() in RESERVED_ALIASES or re.fullmatch(r"[vV]\d+", name):
                raise ValueError(f"recipe name '{name}' is reserved: the recipe name becomes its MLflow alias, and "
                                 f"{', '.join(RESERVED_ALIASES)} and v<number> mean something else there")
            if name.startswith(SEARCH_PREFIX):
                raise ValueError(f"recipe name '{name}' starts with '{SEARCH_PREFIX}', which names the search's "
                                 "front members (search-1, ...): choose another name")
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"recipe name '{name}' must be letters, digits, '-' or '_' (it names a folder)")
        return self


def check_against_teacher(recipes: CompressParams, num_layers: int, num_heads: int,
                          hidden_size: int | None = None, family: Family | None = None,
                          weight_layers: int | None = None) -> list[str]:
    """Problems that need the teacher's shape and family, as ``recipe[step].kind: message`` lines.

    ``weight_layers``: layers with weights of their own when fewer than ``num_layers`` (ALBERT
    shares one layer across all passes, so its heads are counted once)."""
    problems = []
    for name, recipe in recipes.recipes.items():
        layers = num_layers
        for i, step in enumerate(recipe.steps):
            where = f"compress.recipes.{name}[{i}].{step.kind}"
            heads_layers = weight_layers or layers
            heads = num_heads * heads_layers
            why = refusal(family, step.kind) if family else None
            if why:
                problems.append(f"{where}: {family.name} models cannot take this step: {why}")
            elif isinstance(step, DropLayersStep):
                dropped = len(set(step.layers)) if step.layers else step.n_drop
                bad = [l for l in (step.layers or ()) if not 0 <= l < layers]
                if bad:
                    problems.append(f"{where}: layers {bad} outside 0..{layers - 1}")
                if dropped >= layers:
                    problems.append(f"{where}: drops {dropped} of {layers} layers; at least one must remain")
                layers -= min(dropped, layers - 1)
            elif isinstance(step, PruneHeadsStep) and step.count is not None and step.count >= heads - heads_layers + 1:
                problems.append(f"{where}: count {step.count} leaves fewer than one head per layer "
                                f"({heads} heads in {heads_layers} layers)")
            elif isinstance(step, FactorizeEmbeddingsStep) and hidden_size and step.rank >= hidden_size:
                problems.append(f"{where}: rank {step.rank} >= embedding width {hidden_size} saves nothing; "
                                f"use a rank below {hidden_size} (ALBERT uses 128 for 768)")
            elif isinstance(step, MixedPrecisionStep) and step.keep_layers:
                bad = [l for l in step.keep_layers if l >= layers]
                if bad:
                    problems.append(f"{where}: keep_layers {bad} outside 0..{layers - 1} (the model has {layers} "
                                    "layers at this step)")
            elif isinstance(step, DistillStep):
                if step.student_layers is not None and step.student_layers > layers:
                    problems.append(f"{where}: student_layers {step.student_layers} > the {layers} layers available")
                bad = [l for l in (step.teacher_layers or ()) if not 0 <= l < layers]
                if bad:
                    problems.append(f"{where}: teacher_layers {bad} outside 0..{layers - 1}")
                layers = step.student_layers or (len(step.teacher_layers) if step.teacher_layers else layers)
    return problems


def check_against_config(recipes: CompressParams, config: dict) -> list[str]:
    """``check_against_teacher`` with the shape and family read from a ``config.json`` dict."""
    family = family_of(config)
    shape = family.shape(config)
    return check_against_teacher(recipes, shape.layers, shape.heads, shape.embedding_width, family,
                                 shape.weight_layers)
