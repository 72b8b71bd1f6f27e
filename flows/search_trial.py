"""One search trial on a worker (``prefect.yaml``'s ``search-trial`` deployment; ``python -m flows.search_trial``).

The search submits one flow run of this per trial when it runs against a Prefect server where the
deployment sits on a work pool (``flows/search.py``). The search asked the study for the trial; the
worker reads its params from the study (``search.storage``, a database server every worker reaches),
fetches the teacher version and the prepared data from the MLflow tracking server, trains and scores
the trial in an MLflow run nested under the search's, and tells the study. A full trial's model goes
to its MLflow run, where the search fetches it if it joins the front.
"""

from __future__ import annotations

import argparse

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import DEFAULT_PARAMS_FILE, load_params
from bertshrink.errors import CompressionError, ParamsError
from bertshrink.search.study import SCORES, STAGES, require_server_storage
from flows._cli import add_debug_option, run_cli
from flows.search import SearchJob, score_trial, search_job
from tasks.transfer import fetch_teacher_task
from tracking.runs import require_shared_tracking


def check_same_study(job: SearchJob, stage: str, study: str) -> None:
    """The worker scores the trial as the submitter would: same search settings, constraints, teacher,
    data and seed, which name the study."""
    if stage not in STAGES:
        raise ParamsError(f"stage must be one of {', '.join(STAGES)} (got {stage!r}).")
    if job.study.names[stage] != study:
        raise ParamsError(f"this worker's search would be study '{job.study.names[stage]}', not '{study}' that the "
                          "trial belongs to: its params file (search, registry or base sections) differs from the "
                          "submitter's. Commit the params file and update the worker's checkout (git pull).")


@flow(name="search-trial")
def search_trial_flow(params_file: str = str(DEFAULT_PARAMS_FILE), stage: str = "", study: str = "", number: int = -1,
                      teacher_version: str = "", parent_run_id: str | None = None) -> dict:
    """Fetch the teacher version, run trial ``number`` of ``study`` and tell the study its scores;
    returns them. A trial that fails is marked failed in the study, and so is this flow run."""
    params = load_params(params_file)
    require_shared_tracking("a search trial's flow run on a worker")
    require_server_storage(params.search.storage)
    if not teacher_version or not parent_run_id:
        raise ParamsError("teacher_version and parent_run_id are empty: the search passes the registered teacher's "
                          "version and its MLflow run.")
    fetch_teacher_task(params, teacher_version)
    job = search_job(params, Artifacts(params.base), parent_run_id, upload_models=True)
    check_same_study(job, stage, study)
    spec = job.study.spec(stage, number)
    job.study.claim(spec)
    failure = score_trial(job, spec)
    if failure:
        raise CompressionError(f"search trial {study} #{number} failed: {failure}")
    return job.study.trial(stage, number).user_attrs[SCORES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_FILE))
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--study", required=True)
    parser.add_argument("--number", required=True, type=int)
    parser.add_argument("--teacher-version", required=True)
    parser.add_argument("--parent-run-id", required=True)
    add_debug_option(parser)
    args = parser.parse_args(argv)
    run_cli(lambda _: search_trial_flow(args.params, args.stage, args.study, args.number, args.teacher_version,
                                        args.parent_run_id), args.params, args.debug)


if __name__ == "__main__":
    main()
