"""Prefect task for the report stage: plots, table and CSV from the metrics files, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.measure import cpu_features
from bertshrink.params import BaseParams
from bertshrink.report import PLOTS, behaviour_table, markdown_table, report_rows, write_csv, write_plots
from tasks.tracking import log_artifact

REPORT_FILE = "report.md"


def report_dir(base: BaseParams) -> Path:
    return Path(base.reports_dir) / "report"


def read_json(path: Path) -> dict | None:
    """A stage's JSON output, or None where that stage has not run (or failed)."""
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(base: BaseParams, names: list[str]) -> list[dict]:
    """The evaluation results that exist, in ``names`` order."""
    return [r for r in (read_json(Path(base.metrics_dir) / f"{n}.json") for n in names) if r]


def machine_line(results: list[dict], comparison: dict | None) -> str:
    machine = (comparison or {}).get("machine") or (results[0].get("machine", {}) if results else {})
    if not machine:
        return ""
    return (f"Measured on {machine.get('cpu_model', '?')} ({cpu_features(machine)}), {machine.get('threads', '?')} "
            f"threads, torch {machine.get('torch', '?')}, onnxruntime {machine.get('onnxruntime', '?')}.")


def promotion_lines(promotion: dict | None) -> list[str]:
    if not promotion:
        return []
    lines = ["## Promotion", "", f"- rule: `{promotion['objective']}` within {constraint_text(promotion['constraints'])}"
             f"{', auto-promote with margin ' + format(promotion['margin'], '.0%') if promotion['auto_promote'] else ''}",
             f"- challenger: {promotion['reason']}", f"- champion: {promotion['champion_reason']}"]
    lines += [f"- not eligible: `{name}`: {why}" for name, why in promotion.get("rejected", {}).items()]
    return lines + [""]


def registry_cell(base: BaseParams, name: str, promotion: dict | None) -> str:
    """``v7 @challenger @champion``, ``not registered (collapsed)``, or empty (the floor is not registered)."""
    record = read_json(Path(base.reports_dir) / "registry" / f"{name}.json")
    if not record:
        return ""
    if record.get("registered") is False:
        return "not registered (collapsed)" if record.get("collapsed") else "not registered"
    aliases = []
    if ((promotion or {}).get("challenger") or {}).get("name") == name:
        aliases.append("@challenger")
        if promotion.get("champion_moved"):
            aliases.append("@champion")
    return " ".join([f"v{record['version']}", *aliases])


def constraint_text(constraints: dict) -> str:
    words = {"min_retention": "retention >= {:.0%}", "min_agreement": "agreement >= {:.0%}",
             "max_p95_ms": "b1 p95 <= {} ms", "max_size_mb": "size <= {} MB"}
    parts = [words[k].format(v) for k, v in constraints.items() if v is not None and k in words]
    return ", ".join(parts) or "no constraints"


def report_markdown(rows: list[dict], title: str, comparison: dict | None, promotion: dict | None,
                    machine: str, baseline: str | None) -> str:
    how = ("Latencies: one interleaved comparison (every batch run by every model back to back), "
           if comparison else "Latencies: each model's own evaluation, ")
    lines = [f"# {title}", "", markdown_table(rows), "",
             how + "forward pass only (tokenization excluded), except the floor, whose time includes its TF-IDF "
             f"featurisation. Ratios: times smaller / faster than the PyTorch fp32 teacher / than `{baseline}`. "
             "Retention: test accuracy / the teacher's. Agreement: share of test predictions equal to the teacher's. "
             "Registry: the version registered by this run and the aliases this run gave it.", "", machine, ""]
    lines += promotion_lines(promotion)
    behaviour = behaviour_table(rows)
    if behaviour:
        lines += ["## Accuracy by class and by input length", "", behaviour, ""]
    lines += ["## Trade-offs", ""] + [f"![{stem}]({stem}.png)" for stem in PLOTS] + [""]
    return "\n".join(lines)


@task(name="report", cache_policy=NO_CACHE)
def report_task(base: BaseParams, names: list[str], baseline: str | None, title: str, run_id: str | None) -> dict:
    """Write ``reports/report/`` (report.md, three PNGs, models.csv); attach it to ``run_id`` and to Prefect."""
    results = load_results(base, names)
    comparison = read_json(Path(base.metrics_dir) / "comparison.json")
    promotion = read_json(Path(base.reports_dir) / "promotion.json")
    rows = report_rows(results, comparison, baseline)
    for row in rows:
        row["registry"] = registry_cell(base, row["model"], promotion)
    out = report_dir(base)
    write_plots(rows, out, title)
    write_csv(rows, out / "models.csv")
    markdown = report_markdown(rows, title, comparison, promotion, machine_line(results, comparison), baseline)
    (out / REPORT_FILE).write_text(markdown)
    if run_id:
        log_artifact(run_id, out, "report")
    create_markdown_artifact(key="bertshrink-report", markdown=markdown, description=title)
    return {"report_dir": str(out), "rows": rows, "markdown": markdown}
