"""Stage flow: time the teacher and every candidate side by side (``python -m flows.compare``).

Separate evaluations, minutes apart, pick up the machine's drift; this one runs every batch
through every model back to back, so the speed ratios in ``metrics/comparison.json`` are like
for like.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from bertshrink.errors import MissingArtifactError
from bertshrink.modelfolder.files import CONFIG_FILE
from flows._cli import candidate_names, run_stage
from tasks.evaluate import compare_latency_task
from tracking.runs import stage_run


def models_to_compare(params: Params) -> list[str]:
    """The teacher, the floor (if trained), then each recipe's (and search member's) candidate on disk."""
    paths = Artifacts(params.base)
    if not (paths.teacher / CONFIG_FILE).is_file():
        raise MissingArtifactError(f"{paths.teacher} has no model: train the teacher first "
                                   "(`python -m flows.teacher` or `dvc repro teacher`).")
    floor = [paths.floor] if params.floor.enabled else []
    candidates = floor + [paths.candidate(name) for name in candidate_names(params)]
    return [str(paths.teacher), *(str(d) for d in candidates if (d / CONFIG_FILE).is_file())]


@flow(name="compare")
def compare_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> dict:
    """Interleaved latency of ``model_dirs`` (default: teacher + existing candidates), teacher first."""
    dirs = model_dirs or models_to_compare(params)
    with stage_run("compare", params.registry, parent_run_id) as run_id:
        return compare_latency_task([str(Path(d)) for d in dirs], params.evaluate, Artifacts(params.base),
                                    params.base.seed, run_id, baseline=params.compress.baseline)


if __name__ == "__main__":
    run_stage(compare_flow, __doc__)
