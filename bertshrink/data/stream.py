"""A large file of texts, read in batches and never whole: what batch scoring streams through.

csv and tsv come in pandas chunks, jsonl in line chunks, parquet in pyarrow record batches; each
batch is a frame with the file's columns. ``count_rows`` sizes a progress bar in one cheap pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from bertshrink.errors import DataSourceError

STREAM_FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in STREAM_FORMATS:
        raise DataSourceError(f"{path}: cannot stream a {suffix or 'suffix-less'} file; use one of "
                              f"{', '.join(STREAM_FORMATS)}.")
    if not path.is_file():
        raise DataSourceError(f"{path} does not exist. Point --input at a {', '.join(STREAM_FORMATS)} file.")
    return suffix


def text_batches(path: Path, text_column: str, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of ``path`` in frames of at most ``batch_rows``, each with the file's columns; a missing
    ``text_column`` is a ``DataSourceError`` naming the columns there are (raised at the first batch)."""
    path = Path(path)
    suffix = _format_of(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        chunks = (batch.to_pandas() for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows))
    elif suffix == ".jsonl":
        chunks = pd.read_json(path, lines=True, chunksize=batch_rows)
    else:
        chunks = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", chunksize=batch_rows,
                             keep_default_na=False, dtype={text_column: str})
    for chunk in chunks:
        if text_column not in chunk.columns:
            raise DataSourceError(f"{path} has no column {text_column!r}; it has {list(chunk.columns)}. "
                                  "Pass --text-column.")
        yield chunk


def count_rows(path: Path) -> int:
    """Rows in ``path`` (parquet: from its footer; text formats: lines, less a csv/tsv header),
    in constant memory; a text that spans lines makes this an upper bound, fine for a progress bar."""
    path = Path(path)
    suffix = _format_of(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as handle:
        lines = sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    return max(0, lines - (suffix != ".jsonl"))
