"""The whole pipeline: prepare -> validate -> teacher -> evaluate -> register
(``python -m flows.pipeline``; ``make run``).

One MLflow parent run per execution, with a nested run per stage. The same stage flows are what
``dvc repro`` runs one by one. After a successful run, ``dvc commit`` records the results in
``dvc.lock`` so that a following ``dvc repro`` knows nothing changed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bertshrink.errors import BertshrinkError
from bertshrink.params import DEFAULT_PARAMS_FILE, Params, load_params
from flows._cli import quiet_libraries
from flows.evaluate import evaluate_flow
from flows.prepare import prepare_flow
from flows.register import register_flow
from flows.teacher import teacher_flow
from flows.validate import validate_flow
from tasks.tracking import git_commit, log_artifact, log_metrics, pipeline_run, set_tags

SUMMARY_COLUMNS = (
    ("model", "model"), ("test acc", "metrics.test.accuracy"), ("test macro-F1", "metrics.test.macro_f1"),
    ("val acc", "metrics.validation.accuracy"), ("params (M)", "parameters"), ("size (MB)", "size.total_bytes"),
    ("b1 p50 ms", "latency.batch_1.p50_ms"), ("b1 p95 ms", "latency.batch_1.p95_ms"),
    ("b32 p50 ms", "latency.batch_32.p50_ms"), ("b32 ex/s", "latency.batch_32.throughput_eps"),
)


def _lookup(result: dict, dotted: str):
    value = result
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _cell(column: str, value) -> str:
    if value is None:
        return "—"
    if column == "params (M)":
        return f"{value / 1e6:.1f}"
    if column == "size (MB)":
        return f"{value / 1e6:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1 else f"{value:.1f}"
    return str(value)


def summary_markdown(results: list[dict], registered: dict | None, seconds: float) -> str:
    """A table of every evaluated model and where it was registered."""
    header = "| " + " | ".join(c for c, _ in SUMMARY_COLUMNS) + " |"
    rule = "|" + "---|" * len(SUMMARY_COLUMNS)
    rows = ["| " + " | ".join(_cell(c, _lookup(r, key)) for c, key in SUMMARY_COLUMNS) + " |" for r in results]
    lines = ["# bertshrink pipeline", "", header, rule, *rows, ""]
    if registered:
        lines.append(f"Registered `{registered['name']}` version {registered['version']} as "
                     f"`@{registered['alias']}` (`{registered['model_uri']}`).")
    machine = results[0].get("machine", {}) if results else {}
    if machine:
        lines.append(f"Measured on {machine.get('cpu_model', '?')}, {machine.get('threads', '?')} threads, "
                     f"torch {machine.get('torch', '?')}, onnxruntime {machine.get('onnxruntime', '?')}.")
    lines.append(f"Pipeline wall time: {seconds / 60:.1f} min.")
    return "\n".join(lines)


def record_in_dvc() -> None:
    """``dvc commit`` so dvc.lock matches what this run produced; skipped outside a DVC repo.

    Runs DVC through this interpreter (``python -m dvc``): ``make run`` calls .venv/bin/python
    without the venv on PATH.
    """
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        print("bertshrink: note: not a DVC repository here; dvc.lock not updated.", file=sys.stderr)
        return
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"bertshrink: note: `dvc commit` failed, dvc.lock not updated:\n{done.stderr}", file=sys.stderr)
    else:
        print("bertshrink: results recorded in dvc.lock; `dvc repro` now reruns only what changes.")


@flow(name="pipeline")
def pipeline_flow(params_file: str = str(DEFAULT_PARAMS_FILE), dvc_commit: bool = True) -> dict:
    """Run every stage once; parameters are parsed (and rejected) before any work starts."""
    params: Params = load_params(params_file)
    started = time.time()
    with pipeline_run(params.registry) as parent:
        set_tags(parent, {"params_file": params_file, "git_commit": git_commit()})
        prepare_flow(params, parent)
        validate_flow(params, parent)
        teacher_flow(params, parent)
        results = evaluate_flow(params, parent)
        registered = register_flow(params, parent)
        seconds = time.time() - started
        markdown = summary_markdown(results, registered, seconds)
        summary_file = Path(params.base.reports_dir) / "pipeline_summary.md"
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(markdown)
        log_artifact(parent, summary_file)
        log_metrics(parent, {"pipeline_seconds": seconds})
        create_markdown_artifact(key="bertshrink-summary", markdown=markdown, description="Models and metrics")
    if dvc_commit:
        record_in_dvc()
    print(markdown)
    return {"parent_run_id": parent, "registered": registered, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    import argparse

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE))
    parser.add_argument("--no-dvc-commit", action="store_true", help="do not record results in dvc.lock")
    args = parser.parse_args(argv)
    try:
        load_params(args.params)  # reject bad params before Prefect or MLflow start
        pipeline_flow(params_file=args.params, dvc_commit=not args.no_dvc_commit)
    except BertshrinkError as err:
        print(f"\nbertshrink: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("\nbertshrink: interrupted; rerun to resume from the last checkpoint.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
