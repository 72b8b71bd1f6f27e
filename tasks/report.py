"""Prefect task for the report stage: plots, table and CSV from the metrics files, logged to MLflow."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from bertshrink.config.artifacts import Artifacts, read_json
from bertshrink.selection.report import machine_line, report_markdown, report_rows, write_csv, write_plots
from tracking.runs import log_artifact

REPORT_FILE = "report.md"


def load_results(paths: Artifacts, names: list[str]) -> list[dict]:
    """The evaluation results that exist, in ``names`` order."""
    return [r for r in (read_json(paths.metrics(n)) for n in names) if r]


def registry_cell(paths: Artifacts, name: str, promotion: dict | None) -> str:
    """``v7 @challenger @champion``, ``not registered (collapsed)``, or empty (the floor is not registered)."""
    record = read_json(paths.registry_record(name))
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


@task(name="report", cache_policy=NO_CACHE)
def report_task(paths: Artifacts, names: list[str], baseline: str | None, title: str, run_id: str | None) -> dict:
    """Write ``reports/report/`` (report.md, three PNGs, models.csv); attach it to ``run_id`` and to Prefect."""
    results = load_results(paths, names)
    comparison = read_json(paths.comparison)
    promotion = read_json(paths.promotion)
    rows = report_rows(results, comparison, baseline)
    for row in rows:
        row["registry"] = registry_cell(paths, row["model"], promotion)
    out = paths.report_dir
    write_plots(rows, out, title)
    write_csv(rows, out / "models.csv")
    markdown = report_markdown(rows, title, comparison, promotion, machine_line(results, comparison), baseline)
    (out / REPORT_FILE).write_text(markdown)
    if run_id:
        log_artifact(run_id, out, "report")
    create_markdown_artifact(key="bertshrink-report", markdown=markdown, description=title)
    return {"report_dir": str(out), "rows": rows, "markdown": markdown}
