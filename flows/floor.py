"""Stage flow: the classical floor, TF-IDF + logistic regression on the same split (``python -m flows.floor``).

Evaluated like the teacher (``python -m flows.evaluate --model-dir models/floor``), it shows whether
a compressed transformer is worth it at all on this data.
"""

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from flows._cli import run_stage
from tasks.floor import train_floor_task
from tracking.runs import stage_run


@flow(name="floor")
def floor_flow(params: Params, parent_run_id: str | None = None) -> dict:
    with stage_run("floor", params.registry, parent_run_id) as run_id:
        return train_floor_task(params.floor, Artifacts(params.base), params.base.seed, run_id)


if __name__ == "__main__":
    run_stage(floor_flow, __doc__)
