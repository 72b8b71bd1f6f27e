"""Stage flow: Great Expectations suite over the prepared splits (``python -m flows.validate``)."""

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from flows._cli import run_stage
from tasks.data import validate_data
from tracking.runs import stage_run


@flow(name="validate")
def validate_flow(params: Params, parent_run_id: str | None = None) -> dict:
    with stage_run("validate", params.registry, parent_run_id) as run_id:
        return validate_data(params.validate_, Artifacts(params.base), run_id)


if __name__ == "__main__":
    run_stage(validate_flow, __doc__)
