"""Stage flow: load the data source, check the rows, and only then write the prepared splits
(``python -m flows.prepare``)."""

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from flows._cli import run_stage
from tasks.data import prepare_data
from tracking.runs import stage_run


@flow(name="prepare")
def prepare_flow(params: Params, parent_run_id: str | None = None) -> dict:
    with stage_run("prepare", params.registry, parent_run_id) as run_id:
        return prepare_data(params.data, params.validate_, Artifacts(params.base), params.base.seed, run_id)


if __name__ == "__main__":
    run_stage(prepare_flow, __doc__)
