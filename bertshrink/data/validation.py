"""Great Expectations (1.x) suite over the prepared data splits.

Every check is a real GX expectation, run by a ``ValidationDefinition`` against a pandas data
source in an in-memory (ephemeral) context, so nothing is written unless ``docs_dir`` is given
(then Data Docs HTML is built there). Batches validated:

* ``rows_<split>``: the split itself (``text``, ``label``): columns exist, text not null / not
  blank / length in bounds, label not null and in ``range(len(label_names))``, row count;
* ``classes_<split>``: one row per declared class (``label``, ``label_name``, ``count``,
  ``share``): every class present, every present class at least ``min_class_share``;
* ``leakage_all``: all splits stacked, one row per (split, normalised text): normalised text
  unique, i.e. no text in more than one split.

Great Expectations is imported lazily, inside the functions, so importing this module is cheap
and has no side effects.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from bertshrink.data.prepare import normalize_text
from bertshrink.config.params import ValidateParams
from bertshrink.errors import DataValidationError


TEXT, LABEL = "text", "label"
ALL_SPLITS = "all"
_CLIP_CHARS = 80


@dataclass
class ValidationFailure:
    """One failed expectation, with what was expected, what was found and offending rows."""

    expectation: str
    split: str
    column: str | None
    description: str
    observed: str
    examples: list[dict] = field(default_factory=list)

    def render(self, index: int) -> str:
        """A readable block for :meth:`ValidationReport.summary`."""
        lines = [
            f"[{index}] {self.expectation}: split '{self.split}'"
            + (f", column '{self.column}'" if self.column else ""),
            f"    expected: {self.description}",
            f"    observed: {self.observed}",
        ]
        if self.examples:
            lines.append("    offending rows:")
            lines += [f"      - {_format_example(ex)}" for ex in self.examples]
        return "\n".join(lines)


@dataclass
class ValidationReport:
    """Outcome of :func:`run_validation`."""

    success: bool
    failures: list[ValidationFailure]
    statistics: dict

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "success": self.success,
            "failures": [asdict(f) for f in self.failures],
            "statistics": self.statistics,
        }

    def summary(self) -> str:
        """One line when OK, else one block per failure."""
        stats = self.statistics
        splits = ", ".join(
            f"{name} ({s.get('rows', 0)} rows)"
            for name, s in stats.get("splits", {}).items()
            if name != ALL_SPLITS
        )
        if self.success:
            return (
                f"Data validation OK: {stats.get('successful_expectations', 0)} of "
                f"{stats.get('evaluated_expectations', 0)} expectations passed on {splits}."
            )
        head = (
            f"Data validation FAILED: {len(self.failures)} of "
            f"{stats.get('evaluated_expectations', 0)} expectations failed on {splits}."
        )
        return "\n".join([head] + [f.render(i) for i, f in enumerate(self.failures, 1)])


@dataclass
class _Batch:
    """A frame to validate, its expectations and how to turn unexpected rows into examples."""

    name: str
    split: str
    frame: pd.DataFrame
    expectations: list
    unit: str
    examples: Callable[[pd.DataFrame, list[int], int], list[dict]]
    result_format: str = "SUMMARY"


# ----------------------------------------------------------------------------------------------
# public API


def run_validation(
    splits: dict[str, pd.DataFrame],
    label_names: list[str],
    params: ValidateParams,
    docs_dir: Path | None = None,
) -> ValidationReport:
    """Run the suite on ``splits``; with ``docs_dir``, also build GX Data Docs HTML there."""
    start = time.perf_counter()
    context = _make_context(docs_dir)
    frames = {name: _rows_frame(df) for name, df in splits.items()}
    batches = [
        batch for name, df in frames.items()
        for batch in _split_batches(name, df, label_names, params)
    ]
    batches.append(_leakage_batch(frames))
    failures: list[ValidationFailure] = []
    per_batch: dict[str, dict] = {}
    for batch in batches:
        result = _run_batch(context, batch, params.max_failed_examples)
        per_batch[batch.name] = dict(result.statistics)
        failures += _failures(batch, result, params.max_failed_examples)
    stats = _statistics(frames, batches, per_batch)
    if docs_dir is not None:
        stats["data_docs_index"] = _build_docs(context, Path(docs_dir))
    stats["elapsed_s"] = round(time.perf_counter() - start, 3)
    return ValidationReport(success=not failures, failures=failures, statistics=stats)


def assert_valid(report: ValidationReport) -> None:
    """Raise :class:`DataValidationError` with the readable summary unless the report passed."""
    if report.success:
        return
    raise DataValidationError(
        report.summary()
        + "\nFix the data source (params.yaml `data.source`, or the data itself) or, if the "
        "data is right, relax the thresholds in params.yaml `validate:`."
    )


# ----------------------------------------------------------------------------------------------
# GX context and runs


def _make_context(docs_dir: Path | None):
    """In-memory GX context, analytics and progress bars off; a docs site only with docs_dir."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites=sites,
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    context.data_sources.add_pandas("bertshrink")
    return context


def _run_batch(context, batch: _Batch, max_examples: int):
    """Register ``batch`` as a dataframe asset + suite + validation definition and run it."""
    import great_expectations as gx

    source = context.data_sources.get("bertshrink")
    definition = source.add_dataframe_asset(batch.name).add_batch_definition_whole_dataframe(
        batch.name
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"bertshrink_{batch.name}"))
    for expectation in batch.expectations:
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"bertshrink_{batch.name}", data=definition, suite=suite)
    )
    result_format: Any = batch.result_format
    if result_format == "SUMMARY":
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": max_examples}
    return validation.run(batch_parameters={"dataframe": batch.frame}, result_format=result_format)


def _build_docs(context, docs_dir: Path) -> str:
    """Build the Data Docs site into ``docs_dir``; return the index.html path."""
    context.build_data_docs()
    index = docs_dir.resolve() / "index.html"
    if not index.exists():  # pragma: no cover - layout changed in another GX version
        found = sorted(docs_dir.resolve().rglob("index.html"))
        index = found[0] if found else index
    return str(index)


# ----------------------------------------------------------------------------------------------
# batches and their expectations


def _rows_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The split with a 0..n-1 index (so GX's unexpected indices are row positions)."""
    return df.reset_index(drop=True)


def _split_batches(
    split: str, df: pd.DataFrame, label_names: list[str], params: ValidateParams
) -> list[_Batch]:
    """The row-level batch and the class-share batch of one split."""
    rows = _Batch(
        name=f"rows_{split}",
        split=split,
        frame=df,
        expectations=_row_expectations(split, len(label_names), params),
        unit="rows",
        examples=_row_examples,
    )
    classes = _Batch(
        name=f"classes_{split}",
        split=split,
        frame=_class_share_frame(df, label_names),
        expectations=_class_expectations(params),
        unit="classes",
        examples=_class_examples,
    )
    return [rows, classes]


def _row_expectations(split: str, n_labels: int, params: ValidateParams) -> list:
    """Expectations on the rows of one split."""
    import great_expectations.expectations as gxe

    min_rows = params.min_train_rows if split == "train" else params.min_eval_rows
    lo, hi = params.min_text_chars, params.max_text_chars
    return [
        gxe.ExpectColumnToExist(column=TEXT, description="a `text` column exists"),
        gxe.ExpectColumnToExist(column=LABEL, description="a `label` column exists"),
        gxe.ExpectColumnValuesToNotBeNull(
            column=TEXT, description="every `text` is present (not null)"
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column=TEXT, regex=r"\S", description="every `text` has a non-whitespace character"
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column=TEXT, min_value=lo, max_value=hi,
            description=f"every `text` is {lo} to {hi} characters long (params.validate)",
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=LABEL, description="every `label` is present (not null)"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=LABEL, value_set=list(range(n_labels)),
            description=f"every `label` is a declared class id 0..{n_labels - 1}",
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=min_rows,
            description=f"the '{split}' split has at least {min_rows} rows (params.validate)",
        ),
    ]


def _class_share_frame(df: pd.DataFrame, label_names: list[str]) -> pd.DataFrame:
    """One row per declared class (zero-count ones included): label, label_name, count, share."""
    labels = df[LABEL] if LABEL in df.columns else pd.Series(dtype="float64")
    counts = labels.value_counts()
    total = len(df)
    rows = []
    for label, name in enumerate(label_names):
        count = int(counts.get(label, 0))
        rows.append({"label": label, "label_name": name, "count": count,
                     "share": count / total if total else 0.0})
    return pd.DataFrame(rows, columns=["label", "label_name", "count", "share"])


def _class_expectations(params: ValidateParams) -> list:
    """At least two classes; every class present; every present class at least ``min_class_share`` of the rows."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    share = params.min_class_share
    return [
        # One class gives a one-output head that scores 1.0 on anything: not a classifier.
        gxe.ExpectTableRowCountToBeBetween(
            min_value=2, description="at least two classes (a classifier needs two labels to tell apart)"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="count", min_value=1, description="every declared class has at least one row"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="share", min_value=share, row_condition=Column("count") > 0,
            description=f"every present class is at least {share:.1%} of the split's rows "
            "(params.validate.min_class_share)",
        ),
    ]


def _normalise(text: Any) -> Any:
    """strip + lower + collapse whitespace; blanks and non-strings become None (not compared)."""
    if not isinstance(text, str):
        return None
    return normalize_text(text) or None  # the same form prepare dedups on, so the two agree


def _leakage_frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All splits stacked, one row per (split, normalised text)."""
    parts = []
    for split, df in frames.items():
        texts = df[TEXT] if TEXT in df.columns else pd.Series([], dtype="object")
        parts.append(pd.DataFrame({
            "split": split,
            "row": range(len(texts)),
            TEXT: texts.to_numpy(),
            "norm_text": texts.map(_normalise).to_numpy(),
        }))
    stacked = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["split", "row", TEXT, "norm_text"])
    present = stacked[stacked["norm_text"].notna()]
    dupes_within_split = present.duplicated(subset=["split", "norm_text"])
    keep = stacked.index.difference(present.index[dupes_within_split])
    return stacked.loc[keep].reset_index(drop=True)


def _leakage_batch(frames: dict[str, pd.DataFrame]) -> _Batch:
    """Normalised text unique over the stacked splits = no text in two splits."""
    import great_expectations.expectations as gxe

    frame = _leakage_frame(frames)
    expectation = gxe.ExpectColumnValuesToBeUnique(
        column="norm_text",
        description="no text (after strip, lower-casing and collapsing whitespace) is in more "
        "than one split",
    )
    return _Batch(name="leakage_all", split=ALL_SPLITS, frame=frame, expectations=[expectation],
                  unit="split rows", examples=_leakage_examples, result_format="COMPLETE")


# ----------------------------------------------------------------------------------------------
# results -> failures


def _failures(batch: _Batch, result, max_examples: int) -> list[ValidationFailure]:
    """One ValidationFailure per unsuccessful expectation result of ``batch``."""
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = dict(config.kwargs)
        indices = _unexpected_indices(item.result or {})
        failures.append(ValidationFailure(
            expectation=config.type,
            split=batch.split,
            column=kwargs.get("column"),
            description=config.description or config.type,
            observed=_observed(item, batch),
            examples=batch.examples(batch.frame, indices, max_examples) if indices else [],
        ))
    return failures


def _unexpected_indices(result: dict) -> list[int]:
    """Row indices of the unexpected values GX reported (complete list when there is one)."""
    raw = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or []
    out = []
    for entry in raw:
        value = next(iter(entry.values()), None) if isinstance(entry, dict) else entry
        if isinstance(value, numbers.Integral):
            out.append(int(value))
    return out


def _observed(item, batch: _Batch) -> str:
    """Human sentence of what GX found."""
    error = _exception_message(item.exception_info or {})
    if error:
        return f"the expectation could not run: {error}"
    result = item.result or {}
    if item.expectation_config.type == "expect_column_to_exist":
        return f"the column is missing; columns are {list(map(str, batch.frame.columns))}"
    if "unexpected_count" in result:
        total = result.get("element_count", len(batch.frame))
        text = (f"{result['unexpected_count']} of {total} {batch.unit} violate it "
                f"({result.get('unexpected_percent') or 0.0:.1f}%)")
        if result.get("missing_count"):
            text += f"; {result['missing_count']} null value(s) not checked"
        return text
    if "observed_value" in result:
        return f"observed value: {result['observed_value']}"
    return "the expectation failed"


def _exception_message(info: dict) -> str | None:
    """The first exception message in GX's exception_info (flat, or keyed by metric id)."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _clip(text: Any) -> Any:
    """First 80 characters of a text (None for null)."""
    if not isinstance(text, str):
        return _plain(text)
    return text if len(text) <= _CLIP_CHARS else text[:_CLIP_CHARS] + "…"


def _plain(value: Any) -> Any:
    """A JSON-friendly Python scalar (NaN/NA -> None, numpy ints/floats -> int/float)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _row_examples(frame: pd.DataFrame, indices: list[int], limit: int) -> list[dict]:
    """Offending rows of a split: row position, clipped text, label."""
    out = []
    for i in indices[:limit]:
        row = frame.iloc[i]
        out.append({"row": i, "text": _clip(row.get(TEXT)), "label": _plain(row.get(LABEL))})
    return out


def _class_examples(frame: pd.DataFrame, indices: list[int], limit: int) -> list[dict]:
    """Offending classes: id, name, row count, share of the split."""
    out = []
    for i in indices[:limit]:
        row = frame.iloc[i]
        out.append({"label": int(row["label"]), "label_name": str(row["label_name"]),
                    "count": int(row["count"]), "share": round(float(row["share"]), 6)})
    return out


def _leakage_examples(frame: pd.DataFrame, indices: list[int], limit: int) -> list[dict]:
    """Leaked texts (grouped by normalised text): clipped text and its rows in each split."""
    groups: dict[str, dict] = {}
    for i in indices:
        row = frame.iloc[i]
        group = groups.setdefault(row["norm_text"], {"text": _clip(row[TEXT]), "rows": {}})
        group["rows"].setdefault(row["split"], int(row["row"]))
    out = []
    for group in list(groups.values())[:limit]:
        out.append({"text": group["text"], "splits": list(group["rows"]), "rows": group["rows"]})
    return out


def _format_example(example: dict) -> str:
    """One offending row/class/text, readable."""
    if "splits" in example:
        where = ", ".join(f"{s} row {r}" for s, r in example["rows"].items())
        return f"in {where}: {example['text']!r}"
    if "label_name" in example:
        return (f"class {example['label_name']!r} (id {example['label']}): {example['count']} "
                f"rows, {example['share']:.1%} of the split")
    text = example.get("text")
    return f"row {example.get('row')}: label={example.get('label')!r}, text={text!r}"


def _statistics(frames: dict[str, pd.DataFrame], batches: list[_Batch],
                per_batch: dict[str, dict]) -> dict:
    """Expectation counts per split (and 'all'), plus totals."""
    splits: dict[str, dict] = {name: {"rows": len(df)} for name, df in frames.items()}
    splits[ALL_SPLITS] = {"rows": sum(len(df) for df in frames.values())}
    totals = {"evaluated_expectations": 0, "successful_expectations": 0}
    for batch in batches:
        stats = per_batch.get(batch.name, {})
        target = splits.setdefault(batch.split, {"rows": len(batch.frame)})
        for key in totals:
            count = int(stats.get(key, 0) or 0)
            target[key] = target.get(key, 0) + count
            totals[key] += count
    totals["unsuccessful_expectations"] = (
        totals["evaluated_expectations"] - totals["successful_expectations"])
    return {**totals, "splits": splits}
