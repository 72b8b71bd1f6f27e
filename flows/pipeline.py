"""The whole pipeline: prepare -> validate -> teacher -> evaluate -> register -> compress ->
evaluate and register each candidate -> compare latencies (``python -m flows.pipeline``; ``make run``).

One MLflow parent run per execution, with a nested run per stage and per recipe. The same stage
flows are what ``dvc repro`` runs one by one. The teacher and the candidates are measured in this
one process, and timed once more side by side (interleaved), so their latency ratios compare. A recipe that fails (in compression, evaluation or
registration) does not stop the others; the run ends with an error naming it. ``dvc commit`` then
records what succeeded in ``dvc.lock``, so that a following ``dvc repro`` knows it is done.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bertshrink.errors import BertshrinkError
from bertshrink.params import DEFAULT_PARAMS_FILE, Params, load_params
from bertshrink.recipes import check_against_config
from bertshrink.sources import resolve_model_source
from flows._cli import quiet_libraries
from flows.compare import compare_flow
from flows.compress import compress_flow, recipes_failed, recipes_that_cannot_apply
from flows.evaluate import evaluate_flow
from flows.prepare import prepare_flow
from flows.register import register_flow
from flows.teacher import teacher_flow
from flows.validate import validate_flow
from tasks.tracking import git_commit, log_artifact, log_metrics, pipeline_run, set_tags

SUMMARY_COLUMNS = (
    ("model", "model"), ("format", "format"), ("test acc", "metrics.test.accuracy"), ("retention", "vs_teacher.retention"),
    ("test macro-F1", "metrics.test.macro_f1"), ("params (M)", "parameters"), ("size (MB)", "size.total_bytes"),
    ("smaller", "vs_teacher.smaller"), ("smaller vs base", "vs_baseline.smaller"),
    ("b1 p50 ms", "latency.batch_1.p50_ms"), ("b1 p95 ms", "latency.batch_1.p95_ms"),
    ("b1 speedup", "vs_teacher.b1_speedup"), ("b1 vs base", "vs_baseline.b1_speedup"),
    ("b32 p50 ms", "latency.batch_32.p50_ms"), ("b32 speedup", "vs_teacher.b32_speedup"),
    ("b32 ex/s", "latency.batch_32.throughput_eps"),
)
RATIO_COLUMNS = ("smaller", "smaller vs base", "b1 speedup", "b1 vs base", "b32 speedup")


def compare_to(result: dict, reference: dict | None) -> dict:
    """Retention of the reference's test accuracy, and size / latency ratios (x times smaller / faster)."""
    def ratio(key, inverse=False):
        a, b = _lookup(result, key), _lookup(reference or {}, key)
        if not a or not b:
            return None
        return b / a if inverse else a / b

    return {"retention": ratio("metrics.test.accuracy"), "smaller": ratio("size.total_bytes", inverse=True),
            "b1_speedup": ratio("latency.batch_1.p50_ms", inverse=True),
            "b32_speedup": ratio("latency.batch_32.p50_ms", inverse=True)}


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
    if column in ("params (M)", "size (MB)"):
        return f"{value / 1e6:.1f}"
    if column in RATIO_COLUMNS:
        return f"{value:.2f}x"
    if column == "retention":
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1 else f"{value:.1f}"
    return str(value)


def with_compared_latency(results: list[dict], comparison: dict | None) -> list[dict]:
    """Each result with its latency from the interleaved comparison, where it has one."""
    models = (comparison or {}).get("models", {})
    return [{**r, "latency": models[r["model"]]["latency"]} if r.get("model") in models else r for r in results]


def model_format(result: dict) -> str:
    """pytorch / onnx, with the quantization mode where there is one (from the folder's metadata)."""
    from bertshrink.modeling import read_model_meta

    meta = read_model_meta(Path(result["model_dir"])) if result.get("model_dir") and Path(result["model_dir"]).is_dir() else {}
    quantization = meta.get("quantization") or {}
    mode = quantization.get("mode")
    return f"{meta.get('format', 'pytorch')} {mode}" if mode else meta.get("format", "pytorch")


def cpu_features(machine: dict) -> str:
    """The CPU features int8 speed depends on (onnxruntime #6695), as 'avx2 yes, avx512_vnni yes, amx_int8 no'."""
    flags = machine.get("cpu_flags", {})
    return ", ".join(f"{name} {'yes' if flags.get(name) else 'no'}" for name in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"))


def summary_markdown(results: list[dict], registered: list[dict], seconds: float,
                     failed: dict[str, str] | None = None, comparison: dict | None = None,
                     baseline: str | None = None) -> str:
    """A table of every evaluated model (the teacher first), where each was registered, what failed.

    Ratios are to the PyTorch fp32 teacher and, when it ran, to ``baseline`` (the standard recipe).
    """
    results = with_compared_latency(results, comparison)
    teacher = results[0] if results else {}
    base = next((r for r in results if r.get("model") == baseline), None)
    rows = [{**r, "format": model_format(r), "vs_teacher": compare_to(r, teacher),
             "vs_baseline": compare_to(r, base) if base else {}} for r in results]
    header = "| " + " | ".join(c for c, _ in SUMMARY_COLUMNS) + " |"
    rule = "|" + "---|" * len(SUMMARY_COLUMNS)
    table = ["| " + " | ".join(_cell(c, _lookup(r, key)) for c, key in SUMMARY_COLUMNS) + " |" for r in rows]
    how = ("Latencies from one interleaved comparison (every batch run by every model back to back; "
           "`metrics/comparison.json`). " if comparison else "")
    against = f" and to `{baseline}` (\"vs base\")" if base else ""
    lines = ["# bertshrink pipeline", "", header, rule, *table, "",
             how + f"Retention, smaller and speedup are relative to the PyTorch fp32 teacher{against}, measured in this run.", ""]
    for record in registered:
        if record.get("registered") is False:
            lines.append(f"- **not registered** `{record['alias']}` (kept for inspection): {record.get('reason')}")
        else:
            lines.append(f"- registered `{record['name']}` version {record['version']} as `@{record['alias']}` "
                         f"({record.get('flavor', 'transformers')} flavour)")
    for name, why in (failed or {}).items():
        lines.append(f"- **failed** `{name}`: {why}")
    lines.append("")
    machine = results[0].get("machine", {}) if results else {}
    if machine:
        lines.append(f"Measured on {machine.get('cpu_model', '?')} ({cpu_features(machine)}), "
                     f"{machine.get('threads', '?')} threads, torch {machine.get('torch', '?')}, "
                     f"onnxruntime {machine.get('onnxruntime', '?')}.")
    lines.append(f"Pipeline wall time: {seconds / 60:.1f} min.")
    return "\n".join(lines)


TEACHER_STAGES = ("prepare", "validate", "teacher", "evaluate", "register")
COMPARE_STAGE = "compare"
CANDIDATE_STAGES = ("compress", "evaluate-candidate", "register-candidate")


def dvc_stages(recipes: list[str]) -> list[str]:
    """The dvc.yaml stages this run produced: the teacher's, and each finished recipe's foreach stages."""
    return [*TEACHER_STAGES, *(f"{stage}@{name}" for name in recipes for stage in CANDIDATE_STAGES), COMPARE_STAGE]


def record_in_dvc(stages: list[str]) -> None:
    """``dvc commit`` the given stages so dvc.lock matches what this run produced; skipped outside DVC.

    Only stages that succeeded: a failed recipe has no outputs to commit and stays "changed" for
    ``dvc repro``. Runs DVC through this interpreter (``python -m dvc``): ``make run`` calls
    .venv/bin/python without the venv on PATH.
    """
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        print("bertshrink: note: not a DVC repository here; dvc.lock not updated.", file=sys.stderr)
        return
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *stages],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"bertshrink: note: `dvc commit` failed, dvc.lock not updated:\n{done.stderr}", file=sys.stderr)
    else:
        print("bertshrink: results recorded in dvc.lock; `dvc repro` now reruns only what changes.")


def evaluate_and_register_candidates(params: Params, parent: str, compressed: dict) -> tuple[list, list, dict]:
    """Each candidate through the teacher's evaluate and register code; a failure skips only that one."""
    results, registered, failed = [], [], dict(compressed["failed"])
    for candidate in compressed["succeeded"]:
        try:
            results += evaluate_flow(params, parent, [candidate["model_dir"]])
            registered += register_flow(params, parent, [candidate["model_dir"]])
        except Exception as err:  # one broken candidate must not stop the others
            failed[candidate["recipe"]] = f"evaluate/register: {type(err).__name__}: {err}"
    return results, registered, failed


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
        compressed = compress_flow(params, parent, raise_on_failure=False)
        candidate_results, candidate_records, failed = evaluate_and_register_candidates(params, parent, compressed)
        results, registered = results + candidate_results, registered + candidate_records
        comparison = compare_flow(params, parent, [r["model_dir"] for r in results]) if len(results) > 1 else None
        seconds = time.time() - started
        markdown = summary_markdown(results, registered, seconds, failed, comparison, params.compress.baseline)
        summary_file = Path(params.base.reports_dir) / "pipeline_summary.md"
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(markdown)
        log_artifact(parent, summary_file)
        log_metrics(parent, {"pipeline_seconds": seconds, "recipes_failed": len(failed)})
        set_tags(parent, {"recipes_failed": ", ".join(failed) or "none"})
        create_markdown_artifact(key="bertshrink-summary", markdown=markdown, description="Models and metrics")
    if dvc_commit and Path(params_file).resolve() != Path(DEFAULT_PARAMS_FILE).resolve():
        print(f"bertshrink: note: dvc.yaml runs {DEFAULT_PARAMS_FILE}, not {params_file}; dvc.lock not updated.",
              file=sys.stderr)
    elif dvc_commit:
        record_in_dvc(dvc_stages([r["alias"] for r in candidate_records]))
    print(markdown)
    if failed:
        raise recipes_failed(failed, len(params.compress.recipes))
    return {"parent_run_id": parent, "registered": registered, "results": results, "seconds": seconds}


def check_recipes_before_training(params: Params) -> None:
    """Recipes that cannot apply to the teacher's shape fail now, not after training it.

    The shape comes from the source model's config when it is on disk (packaged or a folder);
    a Hub id is checked by the compress stage once the teacher exists.
    """
    try:
        config_file = Path(resolve_model_source(params.teacher.model)) / "config.json"
    except BertshrinkError:
        return  # the teacher stage reports a bad model source with its own message
    if params.compress.recipes and config_file.is_file():
        problems = check_against_config(params.compress, json.loads(config_file.read_text()))
        if problems:
            raise recipes_that_cannot_apply(problems)


def main(argv: list[str] | None = None) -> None:
    import argparse

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE))
    parser.add_argument("--no-dvc-commit", action="store_true", help="do not record results in dvc.lock")
    args = parser.parse_args(argv)
    try:
        # reject bad params before Prefect or MLflow start
        check_recipes_before_training(load_params(args.params))
        pipeline_flow(params_file=args.params, dvc_commit=not args.no_dvc_commit)
    except BertshrinkError as err:
        print(f"\nbertshrink: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("\nbertshrink: interrupted; rerun to resume from the last checkpoint.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
