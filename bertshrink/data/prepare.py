"""Deterministic, seeded, stratified splits written as Parquet plus ``meta.json``.

A source's own splits are reused; the ones it lacks are carved out of its train split. The
prepared folder is the contract between stages: ``{train,validation,test}.parquet`` with columns
``text`` and ``label`` (int ids), and ``meta.json`` with label names, row counts and a content
hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bertshrink.config.params import DataParams
from bertshrink.data.sources import RawDataset
from bertshrink.errors import DataSourceError, MissingArtifactError
from bertshrink.modelfolder.files import swapped_in

SPLITS = ("train", "validation", "test")
TRANSFER = "transfer"
META_FILE = "meta.json"


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


def _drop_duplicates(raw: RawDataset) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Drop repeated texts within a split, and train rows that reappear in an evaluation split."""
    dropped: dict[str, int] = {}
    seen_eval: set[str] = set()
    frames = {}
    for name in ("test", "validation", "train"):  # evaluation splits win over train
        if name not in raw.splits:
            continue
        frame = raw.splits[name]
        keys = frame["text"].map(normalize_text)
        keep = ~keys.duplicated() & ~keys.isin(seen_eval)
        frames[name] = frame[keep].reset_index(drop=True)
        dropped[name] = int((~keep).sum())
        if name != "train":
            seen_eval |= set(keys[keep])
    return frames, dropped


def _stratified_split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Split with ``datasets``' stratified splitter; fall back to random if a class is too rare."""
    import datasets

    ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
    labels = sorted(frame["label"].unique().tolist())
    ds = ds.cast_column("label", datasets.ClassLabel(num_classes=max(labels) + 1)) if min(labels) >= 0 else ds
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
        stratified = True
    except ValueError:  # fewer than two rows in some class, or a label of -1
        parts = ds.train_test_split(test_size=fraction, seed=seed)
        stratified = False
    to_frame = lambda d: d.to_pandas().astype({"label": "int64"}).reset_index(drop=True)  # noqa: E731
    return to_frame(parts["train"]), to_frame(parts["test"]), stratified


def _transfer_texts(pool: pd.DataFrame, kept: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame | None:
    """The training rows that capping left out (at most ``limit``, seeded), without their labels."""
    if limit == 0:
        return None
    taken = set(kept["text"])
    left_out = pool[~pool["text"].isin(taken)]
    if limit is not None and len(left_out) > limit:
        left_out = left_out.sample(n=limit, random_state=seed)
    return left_out[["text"]].reset_index(drop=True)


def _cap(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """A seeded, stratified subsample of at most ``limit`` rows (CPU budgets)."""
    if limit is None or len(frame) <= limit:
        return frame
    _, kept, _ = _stratified_split(frame, limit / len(frame), seed)
    return kept


def prepare_splits(raw: RawDataset, params: DataParams, seed: int) -> PreparedData:
    """Make train/validation/test from a raw dataset: dedupe, carve missing splits, cap sizes."""
    frames, dropped = _drop_duplicates(raw) if params.drop_duplicates else (dict(raw.splits), {})
    if "train" not in frames or frames["train"].empty:
        raise DataSourceError(f"{raw.source} has no training rows after loading.")
    provenance = dict(raw.provenance)
    stratified = {}
    for name, fraction in (("test", params.test_size), ("validation", params.validation_size)):
        if name in frames:
            continue
        # Fractions are of the whole pool, so carve in the order test, then validation.
        pool = len(frames["train"]) + sum(len(f) for k, f in frames.items() if k != "train")
        share = min(0.9, fraction * pool / len(frames["train"]))
        frames["train"], frames[name], stratified[name] = _stratified_split(frames["train"], share, seed)
        provenance[name] = f"carved from train ({share:.1%}, seed {seed})"
    pool = frames["train"]
    frames["train"] = _cap(pool, params.max_train_samples, seed)
    transfer = _transfer_texts(pool, frames["train"], params.transfer_samples, seed)
    for name in ("validation", "test"):
        frames[name] = _cap(frames[name], params.max_eval_samples, seed)
    splits = {name: frames[name][["text", "label"]].reset_index(drop=True) for name in SPLITS}
    meta = {
        "source": raw.source,
        "label_names": list(raw.label_names),
        "num_labels": len(raw.label_names),
        "rows": {name: len(splits[name]) for name in SPLITS},
        "class_counts": {name: splits[name]["label"].value_counts().sort_index().to_dict() for name in SPLITS},
        "duplicates_dropped": dropped,
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
