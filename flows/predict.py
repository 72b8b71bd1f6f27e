"""Batch scoring: classify every text of a large file with a registered model
(``python -m flows.predict --input file.csv [--model models:/<name>@champion] [--text-column text]
[--output predictions.csv] [--batch-size 256]``).

The file is streamed in batches (``bertshrink.data.stream``), never held whole, with a progress
bar; each batch goes through the registered model as MLflow loads it for serving, so the labels
are what the served model answers. The output, the input's columns plus ``label`` and ``score``,
is written beside its destination and moved in place only when every row is scored, so a failed
or interrupted run leaves an earlier output as it was.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from bertshrink.config.params import Params
from bertshrink.data.stream import count_rows, text_batches
from flows._cli import run_stage
from tracking.runs import configure_tracking
from tracking.serving import label_and_score, load_registered


def score_file(model, source: Path, text_column: str, output: Path, batch_size: int) -> int:
    """Score ``source`` batch by batch into ``output`` (moved in place at the end); returns the rows scored."""
    partial = output.with_name(f".{output.name}.partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    scored = 0
    try:
        with tqdm(total=count_rows(source), unit="rows", file=sys.stderr, desc=source.name) as progress:
            for batch in text_batches(source, text_column, batch_size):
                answers = label_and_score(model, batch[text_column].astype(str).tolist())
                batch = batch.assign(label=answers["label"].to_numpy(), score=answers["score"].to_numpy())
                batch.to_csv(partial, mode="a" if scored else "w", header=not scored, index=False)
                scored += len(batch)
                progress.update(len(batch))
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return scored


def predict_flow(params: Params, parent_run_id: str | None = None, model: str | None = None, input: str = "",
                 text_column: str = "text", output: str | None = None, batch_size: int = 256) -> dict:
    """Score ``input`` with ``model`` (default: the champion of params.yaml's registered model)."""
    configure_tracking(params.registry)
    uri = model or f"models:/{params.registry.model_name}@champion"
    source = Path(input)
    target = Path(output) if output else source.with_name(f"{source.stem}.predictions.csv")
    rows = score_file(load_registered(uri), source, text_column, target, batch_size)
    print(f"bertshrink: {rows} rows of {source} scored by {uri} -> {target}")
    return {"model": uri, "rows": rows, "output": str(target)}


def _options(parser) -> None:
    parser.add_argument("--model", default=None, help="model URI (default: models:/<registry.model_name>@champion)")
    parser.add_argument("--input", required=True, help="csv, tsv, jsonl or parquet file of texts")
    parser.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    parser.add_argument("--output", default=None, help="csv to write (default: <input>.predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch (default: 256)")


if __name__ == "__main__":
    run_stage(predict_flow, __doc__.splitlines()[0], extra=_options,
              cli_args=("model", "input", "text_column", "output", "batch_size"))
