"""One round of ``benchmarks/fan_out_scaling.py``, in its submitting folder: the pipeline's own recipe
stage (``flows.fan_out.fan_out_recipes``: submit every recipe to the pool, wait, fetch each candidate),
timed; then each recipe's flow run as the Prefect server recorded it.

``python benchmarks/fan_out_round.py PARAMS_FILE OUT_JSON`` with ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI`` set and ``scale_out.mode: deployment`` in the params file. A separate
process so that Prefect reads its settings from that environment.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the submitting folder

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId  # noqa: E402

from bertshrink.config.params import load_params  # noqa: E402
from flows.fan_out import fan_out_recipes, recipe_deployment  # noqa: E402


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def recipe_runs(deployment_id: UUID, since: datetime) -> list[dict]:
    """The deployment's flow runs created since ``since`` (this round's), oldest first."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     limit=200)
    rows = [{"recipe": run.parameters.get("recipe"), "flow_run": run.name,
             "state": run.state.name if run.state else None,
             "submitted": _iso(run.created), "started": _iso(run.start_time), "ended": _iso(run.end_time),
             # waiting for a free worker, then the worker's pick-up and the flow run's process start
             "queued_seconds": _seconds(run.created, run.start_time),
             # fetching the teacher, compressing, evaluating and registering, as the server timed it
             "run_seconds": run.total_run_time.total_seconds()}
            for run in runs if run.created and run.created >= since]
    return sorted(rows, key=lambda row: row["submitted"])


def first_submission_to_last_end(runs: list[dict]) -> float | None:
    """Wall time of the recipes on the pool: the first flow run's creation to the last one's end."""
    ends = [datetime.fromisoformat(r["ended"]) for r in runs if r["ended"]]
    if not runs or len(ends) < len(runs):
        return None
    return (max(ends) - min(datetime.fromisoformat(r["submitted"]) for r in runs)).total_seconds()


def main(argv: list[str]) -> None:
    params_file, out = argv
    params = load_params(params_file)
    deployment = recipe_deployment(params)
    since = datetime.now(timezone.utc)
    started = time.monotonic()
    _, records, failed = fan_out_recipes(params, params_file, None, deployment)
    stage_seconds = time.monotonic() - started
    runs = recipe_runs(deployment.id, since)
    Path(out).write_text(json.dumps({
        "wall_seconds": first_submission_to_last_end(runs), "stage_seconds": stage_seconds, "runs": runs,
        "registered": sorted(r["alias"] for r in records if r.get("registered") is not False),
        "failed": failed}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
