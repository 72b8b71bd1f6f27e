"""Deterministic, seeded, stratified splits written as Parquet plus ``meta.json``.

A source's own splits are reused; the ones it lacks are carved out of its train split. The
prepared folder is the contract between stages: ``{train,validation,test}.parquet`` with columns
``text`` and ``label`` (int ids), and ``meta.json`` with label names, row counts and a content
hash. Nothing is dropped silently: each kind of dropped row (``DROP_KINDS``) is counted in
``meta["dropped"]`` with its source lines (or row indices), and every warning (drops, a split
chosen at random because stratifying was impossible) is logged and kept in ``meta["warnings"]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bertshrink.config.params import DataParams
from bertshrink.data.sources import LINE, RawDataset
from bertshrink.errors import DataSourceError, MissingArtifactError
from bertshrink.modelfolder.files import swapped_in

SPLITS = ("train", "validation", "test")
TRANSFER = "transfer"
META_FILE = "meta.json"
# kind of dropped row -> why, as the warning says it
DROP_KINDS = {
    "blank_text": "a blank text",
    "missing_label": "no label",
    "duplicate": "a text repeated earlier in the same split",
    "in_evaluation_split": "a text that an evaluation split already has (test, then validation, keep theirs)",
}
LISTED_LOCATIONS = 20  # source lines (or rows) listed per kind and split in meta.json

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The three splits, their label names, and what was done to make them; ``transfer``: unlabelled
    texts for distillation (``None`` unless ``data.transfer_samples`` asked for them)."""

    splits: dict[str, pd.DataFrame]
    label_names: list[str]
    meta: dict = field(default_factory=dict)
    transfer: pd.DataFrame | None = None

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]


def normalize_text(text: str) -> str:
    """The form under which two texts count as the same (dedup and leakage checks)."""
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def content_hash(splits: dict[str, pd.DataFrame], transfer: pd.DataFrame | None = None) -> str:
    """sha256 over every split's (text, label) rows in order, then the transfer texts if any;
    independent of Parquet encoding (and unchanged for data without a transfer set)."""
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(f"[{name}]".encode())
        for text, label in zip(splits[name]["text"], splits[name]["label"]):
            digest.update(str(text).encode("utf-8", "replace"))
            digest.update(f"\x1f{label}\x1e".encode())
    if transfer is not None:
        digest.update(f"[{TRANSFER}]".encode())
        for text in transfer["text"]:
            digest.update(str(text).encode("utf-8", "replace") + b"\x1e")
    return digest.hexdigest()


def _is_blank(text) -> bool:
    return (not isinstance(text, str) and pd.isna(text)) or normalize_text(text) == ""


def _row_kinds(frame: pd.DataFrame, seen_eval: set[str], drop_duplicates: bool) -> pd.Series:
    """Per row, the first kind of drop that applies to it (``DROP_KINDS``), or None to keep it."""
    kinds = pd.Series(None, index=frame.index, dtype="object")
    kinds[frame["text"].map(_is_blank)] = "blank_text"
    kinds[kinds.isna() & frame["label"].isna()] = "missing_label"
    if drop_duplicates:
        keys = frame["text"].map(normalize_text)
        kinds[kinds.isna() & keys.isin(seen_eval)] = "in_evaluation_split"
        kept = kinds.isna()
        kinds[kept & keys.where(kept).duplicated()] = "duplicate"
    return kinds


def _locations(frame: pd.DataFrame, rows: pd.Series) -> tuple[str, list[int]]:
    """('lines', source line numbers) where the source has them, else ('rows', row indices)."""
    if LINE in frame.columns:
        return "lines", [int(n) for n in frame.loc[rows, LINE]]
    return "rows", [int(i) for i in frame.index[rows]]


def _drop_rows(raw: RawDataset, drop_duplicates: bool) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Drop rows without a text or a label, and (with ``drop_duplicates``) texts repeated within a
    split or already in an evaluation split; returns the frames and what went, by kind and split."""
    dropped: dict[str, dict] = {kind: {} for kind in DROP_KINDS}
    seen_eval: set[str] = set()
    frames = {}
    for name in ("test", "validation", "train"):  # evaluation splits win over train
        if name not in raw.splits:
            continue
        frame = raw.splits[name].reset_index(drop=True)
        kinds = _row_kinds(frame, seen_eval, drop_duplicates)
        for kind in DROP_KINDS:
            rows = kinds == kind
            if rows.any():
                unit, where = _locations(frame, rows)
                dropped[kind][name] = {"count": int(rows.sum()), unit: where[:LISTED_LOCATIONS]}
        kept = frame[kinds.isna()]
        frames[name] = kept[["text", "label"]].astype({"label": "int64"}).reset_index(drop=True)
        if name != "train":
            seen_eval |= set(kept["text"].map(normalize_text))
    return frames, dropped


def _drop_warnings(dropped: dict[str, dict], raw: RawDataset) -> list[str]:
    """One readable sentence per kind and split that lost rows."""
    out = []
    for kind, splits in dropped.items():
        for split, entry in splits.items():
            unit = "lines" if "lines" in entry else "rows"
            listed = ", ".join(map(str, entry[unit])) + (", ..." if entry["count"] > len(entry[unit]) else "")
            out.append(f"dropped {entry['count']} of {len(raw.splits[split])} {split} rows of "
                       f"{raw.provenance.get(split, raw.source)} with {DROP_KINDS[kind]}: {unit} {listed}")
    return out


def _fallback_reason(frame: pd.DataFrame, err: ValueError) -> str:
    unknown = int((frame["label"] < 0).sum())
    return f"{unknown} rows have a label outside the class names" if unknown else str(err)


def _stratified_split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """Split with ``datasets``' stratified splitter; fall back to random, returning why, if a class
    is too rare or a label is outside the class names."""
    import datasets

    ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
    labels = sorted(frame["label"].unique().tolist())
    ds = ds.cast_column("label", datasets.ClassLabel(num_classes=max(labels) + 1)) if min(labels) >= 0 else ds
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
        fallback = None
    except ValueError as err:  # fewer than two rows in some class, or a label of -1
        parts = ds.train_test_split(test_size=fraction, seed=seed)
        fallback = _fallback_reason(frame, err)
    to_frame = lambda d: d.to_pandas().astype({"label": "int64"}).reset_index(drop=True)  # noqa: E731
    return to_frame(parts["train"]), to_frame(parts["test"]), fallback


def _carve_share(fraction: float, pool: int, train_rows: int) -> float:
    """The share of the train rows to carve so that the split is ``fraction`` of the whole pool."""
    return min(0.9, fraction * pool / train_rows)


def _rows_left(train_rows: int, own_eval_rows: int, fractions: list[float]) -> int:
    """Training rows left after carving each fraction (rounded up, as ``datasets``' splitter does)."""
    pool, left = train_rows + own_eval_rows, train_rows
    for fraction in fractions:
        if left < 1:
            break
        left -= math.ceil(_carve_share(fraction, pool, left) * left)
    return left


def _require_rows_to_carve(frames: dict[str, pd.DataFrame], carve: dict[str, float], raw: RawDataset,
                           dropped: dict[str, dict]) -> None:
    """A ``DataSourceError`` with the numbers when carving ``carve`` would leave no row to train on."""
    train, own = len(frames["train"]), sum(len(f) for k, f in frames.items() if k != "train")
    if _rows_left(train, own, list(carve.values())) >= 1:
        return
    needed = next(n for n in range(train + 1, 10_000) if _rows_left(n, own, list(carve.values())) >= 1)
    lost = sum(entry["count"] for splits in dropped.values() for entry in splits.values())
    shares = " and ".join(f"{name} ({fraction:.0%})" for name, fraction in carve.items())
    raise DataSourceError(
        f"{raw.source} has {train} labelled training row{'s' if train != 1 else ''}"
        + (f" ({lost} more dropped: blank, unlabelled or repeated)" if lost else "")
        + f"; carving {shares} out of them needs at least {needed}. Add rows, give the source its own "
        "validation and test files (a folder with train/validation/test files), or lower "
        "data.validation_size / data.test_size."
    )


def _carve_split(train: pd.DataFrame, rows_wanted: float, min_words: int | None, seed: int,
                 raw: RawDataset, outermost: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, str | None, str]:
    """(train left, carved split, why it is not stratified or None, where it came from): about
    ``rows_wanted`` rows out of ``train``, or out of its rows of at least ``min_words`` words (and,
    with ``outermost``, found inside no other row)."""
    if min_words is None:
        share = _carve_share(1.0, rows_wanted, len(train))
        rest, carved, fallback = _stratified_split(train, share, seed)
        return rest, carved, fallback, f"train ({share:.1%}"
    long_enough = train["text"].str.split().str.len() >= min_words
    if outermost:
        long_enough &= ~train["text"].map(normalize_text).isin(_spans_of(train["text"], min_words, whole=False))
    eligible = train[long_enough].reset_index(drop=True)
    which = f"rows of >= {min_words} words{' inside no other row' if outermost else ''}"
    if len(eligible) < 2:
        raise DataSourceError(
            f"{len(eligible)} of {raw.source}'s {len(train)} training rows are {which} (data.carve_min_words"
            f"{', data.carve_outermost' if outermost else ''}): too few to carve a split from. Lower "
            "data.carve_min_words, or set it to null.")
    share = _carve_share(1.0, rows_wanted, len(eligible))
    kept, carved, fallback = _stratified_split(eligible, share, seed)
    rest = pd.concat([train[~long_enough], kept], ignore_index=True)
    return rest, carved, fallback, f"train {which} ({share:.1%} of {len(eligible)}"


def _spans_of(texts, min_words: int, whole: bool = True) -> set[str]:
    """Every run of at least ``min_words`` words inside one of ``texts``; ``whole`` False leaves each
    text itself out of its own runs (it stays in only when it sits inside another text)."""
    spans: set[str] = set()
    for text in texts:
        own = word_spans(text, min_words)
        if not whole:
            own.discard(normalize_text(text))
        spans |= own
    return spans


def word_spans(text: str, min_words: int) -> set[str]:
    """Every run of at least ``min_words`` consecutive words of ``text`` (normalized), itself included."""
    words = normalize_text(text).split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + min_words, len(words) + 1)}


def _drop_eval_spans(frames: dict[str, pd.DataFrame], min_words: int) -> tuple[pd.DataFrame, int]:
    """(train without the rows of >= ``min_words`` words found inside an evaluation text, how many went)."""
    inside = set().union(*(_spans_of(frame["text"], min_words) for name, frame in frames.items() if name != "train"))
    train = frames["train"]
    leaks = train["text"].map(normalize_text).isin(inside)
    return train[~leaks].reset_index(drop=True), int(leaks.sum())


def _transfer_texts(pool: pd.DataFrame, kept: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame | None:
    """The training rows that capping left out (at most ``limit``, seeded), without their labels."""
    if limit == 0:
        return None
    taken = set(kept["text"])
    left_out = pool[~pool["text"].isin(taken)]
    if limit is not None and len(left_out) > limit:
        left_out = left_out.sample(n=limit, random_state=seed)
    return left_out[["text"]].reset_index(drop=True)


def _cap(frame: pd.DataFrame, limit: int | None, seed: int) -> tuple[pd.DataFrame, str | None]:
    """A seeded, stratified subsample of at most ``limit`` rows (CPU budgets), and why it is
    random instead, if it is."""
    if limit is None or len(frame) <= limit:
        return frame, None
    _, kept, fallback = _stratified_split(frame, limit / len(frame), seed)
    return kept, fallback


def _random_warning(what: str, reason: str) -> str:
    return f"{what} chosen at random, not stratified by label: {reason}"


def prepare_splits(raw: RawDataset, params: DataParams, seed: int) -> PreparedData:
    """Make train/validation/test from a raw dataset: drop unusable and repeated rows, carve missing
    splits, cap sizes. Every drop, and every split that could not be stratified, is warned about."""
    frames, dropped = _drop_rows(raw, params.drop_duplicates)
    warnings = _drop_warnings(dropped, raw)
    if "train" not in frames or frames["train"].empty:
        raise DataSourceError(f"{raw.source} has no usable training rows"
                              + (f" ({'; '.join(warnings)})" if warnings else "") + ". Fix the data source.")
    provenance = dict(raw.provenance)
    stratified = {}
    # Fractions are of the whole pool, so carve in the order test, then validation.
    carve = {name: fraction for name, fraction in (("test", params.test_size), ("validation", params.validation_size))
             if name not in frames}
    _require_rows_to_carve(frames, carve, raw, dropped)
    pool_rows = sum(len(f) for f in frames.values())
    for name, fraction in carve.items():
        frames["train"], frames[name], fallback, origin = _carve_split(frames["train"], fraction * pool_rows,
                                                                       params.carve_min_words, seed, raw,
                                                                       params.carve_outermost)
        stratified[name] = fallback is None
        warnings += [_random_warning(f"the {name} split carved from train was", fallback)] if fallback else []
        provenance[name] = f"carved from {origin}, seed {seed})"
    if params.drop_eval_spans is not None:
        frames["train"], spans = _drop_eval_spans(frames, params.drop_eval_spans)
        warnings += [f"dropped {spans} training rows of >= {params.drop_eval_spans} words found inside an evaluation "
                     "text (data.drop_eval_spans)"] if spans else []
        provenance["train"] = (f"{provenance.get('train', raw.source)}, less {spans} rows found inside evaluation "
                               f"texts (data.drop_eval_spans: {params.drop_eval_spans})")
    pool = frames["train"]
    caps = {"train": params.max_train_samples, "validation": params.max_eval_samples, "test": params.max_eval_samples}
    for name, limit in caps.items():
        frames[name], fallback = _cap(frames[name], limit, seed)
        warnings += [_random_warning(f"the {limit} {name} rows kept by the size cap were", fallback)] if fallback else []
    transfer = _transfer_texts(pool, frames["train"], params.transfer_samples, seed)
    for line in warnings:
        log.warning("%s", line)
    splits = {name: frames[name][["text", "label"]].reset_index(drop=True) for name in SPLITS}
    meta = {
        "source": raw.source,
        "label_names": list(raw.label_names),
        "num_labels": len(raw.label_names),
        "rows": {name: len(splits[name]) for name in SPLITS},
        "class_counts": {name: splits[name]["label"].value_counts().sort_index().to_dict() for name in SPLITS},
        "dropped": dropped,
        "warnings": warnings,
        "provenance": provenance,
        "stratified": stratified,
        "seed": seed,
        "params": params.model_dump(mode="json"),
    }
    meta["class_counts"] = {k: {str(l): int(c) for l, c in v.items()} for k, v in meta["class_counts"].items()}
    if transfer is not None:
        meta["rows"][TRANSFER] = len(transfer)
    meta["content_hash"] = content_hash(splits, transfer)
    return PreparedData(splits, list(raw.label_names), meta, transfer)


def write_prepared(prepared: PreparedData, out_dir: Path) -> Path:
    """Write Parquet + meta.json into a temporary folder, then swap it in whole."""
    with swapped_in(out_dir) as tmp:
        for name, frame in prepared.splits.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        if prepared.transfer is not None:
            prepared.transfer.to_parquet(tmp / f"{TRANSFER}.parquet", index=False)
        (tmp / META_FILE).write_text(json.dumps(prepared.meta, indent=2, sort_keys=True))
    return Path(out_dir)


def load_prepared(prepared_dir: Path) -> PreparedData:
    """Read the prepared folder, or say which stage makes it."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / META_FILE
    missing = [p for p in [meta_path, *(prepared_dir / f"{s}.parquet" for s in SPLITS)] if not p.is_file()]
    if missing:
        raise MissingArtifactError(
            f"Prepared data not found: {', '.join(map(str, missing))}. Run the prepare stage first "
            "(`python -m flows.prepare` or `dvc repro prepare`)."
        )
    meta = json.loads(meta_path.read_text())
    splits = {s: pd.read_parquet(prepared_dir / f"{s}.parquet") for s in SPLITS}
    transfer_path = prepared_dir / f"{TRANSFER}.parquet"
    transfer = pd.read_parquet(transfer_path) if transfer_path.is_file() else None
    return PreparedData(splits, meta["label_names"], meta, transfer)
