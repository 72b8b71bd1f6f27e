"""Serve check: load ``models:/<name>@champion`` through MLflow and classify sample texts
(``python -m flows.serve_check [--alias champion] [--rows 8]``).

Proves that what the registry holds works, PyTorch and ONNX champions alike: the texts are the
first test rows, and the registered model must predict what the evaluated folder predicted for
them (``reports/predictions/<model>.json``). Exits non-zero if it cannot load, or if it disagrees
on more than a quarter of them (dynamic int8 scales activations per batch, so padding can flip a
near-tie; a broken artifact disagrees on about half or more).
"""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from bertshrink.data.prepare import load_prepared
from bertshrink.errors import MissingArtifactError, ModelSourceError
from flows._cli import run_stage
from tracking.registry import version_model_name
from tracking.serving import classify_registered
from tracking.runs import configure_tracking


def registered_name(client: MlflowClient, model_name: str, alias: str) -> tuple[str, str]:
    """(version, model name as our folders call it: the recipe, or ``teacher``) behind ``alias``."""
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        raise MissingArtifactError(f"{model_name} has no @{alias}: run the pipeline (make run) or promote one "
                                   "(python -m flows.promote --alias challenger).") from None
    return str(version.version), version_model_name(version)


def serve_check_flow(params: Params, parent_run_id: str | None = None, alias: str = "champion", rows: int = 8) -> dict:
    """Classify the first ``rows`` test texts with ``models:/<name>@<alias>``; compare with its evaluation."""
    configure_tracking(params.registry)
    version, name = registered_name(MlflowClient(), params.registry.model_name, alias)
    paths = Artifacts(params.base)
    prepared = load_prepared(paths.prepared)
    test, labels = prepared.splits["test"].head(rows), prepared.label_names
    uri = f"models:/{params.registry.model_name}@{alias}"
    served = classify_registered(uri, test["text"].astype(str).tolist(), params.evaluate.max_length)
    expected_file = paths.predictions(name)
    expected = ([labels[i] for i in json.loads(expected_file.read_text())["test"][:rows]]
                if expected_file.is_file() else None)
    for text, gold, got in zip(test["text"], test["label"], served):
        print(f"  {got:>14}  (gold {labels[gold]:>14})  {str(text)[:70]!r}")
    matches = None if expected is None else sum(a == b for a, b in zip(served, expected))
    print(f"bertshrink: {uri} (v{version}, {name}) served {len(served)} texts"
          + ("" if matches is None else f"; {matches}/{len(served)} as its evaluation predicted"))
    # Dynamic int8 scales activations per batch, so padding can flip a near-tie: allow a quarter.
    if any(label not in labels for label in served) or (matches is not None and matches < 0.75 * len(served)):
        raise ModelSourceError(f"{uri} served labels {served}, but its evaluation predicted {expected}: the "
                               "registered artifact does not behave like the evaluated folder.")
    return {"uri": uri, "version": version, "model": name, "served": served, "expected": expected}


def _options(parser) -> None:
    parser.add_argument("--alias", default="champion", help="alias to load (default: champion)")
    parser.add_argument("--rows", type=int, default=8, help="test texts to classify (default: 8)")


if __name__ == "__main__":
    run_stage(serve_check_flow, __doc__.splitlines()[0], extra=_options, cli_args=("alias", "rows"))
