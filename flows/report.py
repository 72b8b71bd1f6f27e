"""Stage flow: the trade-off report (``python -m flows.report``).

Reads ``metrics/*.json`` (teacher, floor, every recipe), ``metrics/comparison.json`` and
``reports/promotion.json``; writes ``reports/report/``: ``report.md`` (a row per model), three
PNG plots (accuracy against batch-1 latency, size and parameters, Pareto frontier drawn) and
``models.csv`` (the data of ``dvc plots``). Attached to the pipeline's parent MLflow run and
published as a Prefect artifact.
"""

from __future__ import annotations

from prefect import flow

from bertshrink.config.artifacts import FLOOR, TEACHER, Artifacts
from bertshrink.config.params import Params
from flows._cli import candidate_names, run_stage
from tasks.report import report_task
from tracking.runs import stage_run


def report_names(params: Params) -> list[str]:
    return [TEACHER, FLOOR, *candidate_names(params)]


def report_title(params: Params) -> str:
    return f"bertshrink: {params.registry.model_name} on {params.data.source}"


@flow(name="report")
def report_flow(params: Params, parent_run_id: str | None = None) -> dict:
    """Write the report; log it to the parent run (or, alone, to its own run)."""
    with stage_run("report", params.registry, parent_run_id) as run_id:
        return report_task(Artifacts(params.base), report_names(params), params.compress.baseline, report_title(params),
                           parent_run_id or run_id)


if __name__ == "__main__":
    run_stage(report_flow, __doc__)
