"""Stage flow: time the teacher and every candidate side by side (``python -m flows.compare``).

Separate evaluations, minutes apart, pick up the machine's drift; this one runs every batch
through every model back to back, so the speed ratios in ``metrics/comparison.json`` are like
for like.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from bertshrink.errors import MissingArtifactError
from bertshrink.params import Params
from flows._cli import run_stage
from tasks.compress import candidate_dir
from tasks.evaluate import compare_latency_task
from tasks.floor import floor_dir
from tasks.tracking import stage_run


def models_to_compare(params: Params) -> list[str]:
    """The teacher, the floor (if trained), then each recipe's candidate that exists on disk."""
    if not (params.base.teacher_dir / "config.json").is_file():
        raise MissingArtifactError(f"{params.base.teacher_dir} has no model: train the teacher first "
                                   "(`python -m flows.teacher` or `dvc repro teacher`).")
    floor = [floor_dir(params.base)] if params.floor.enabled else []
    candidates = floor + [candidate_dir(params.base, name) for name in params.compress.recipes]
    return [str(params.base.teacher_dir), *(str(d) for d in candidates if (d / "config.json").is_file())]


@flow(name="compare")
def compare_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> dict:
    """Interleaved latency of ``model_dirs`` (default: teacher + existing candidates), teacher first."""
    dirs = model_dirs or models_to_compare(params)
    with stage_run("compare", params.registry, parent_run_id) as run_id:
        return compare_latency_task([str(Path(d)) for d in dirs], params.evaluate, params.base, run_id,
                                    baseline=params.compress.baseline)


if __name__ == "__main__":
    run_stage(compare_flow, __doc__)
