"""Stage flow: time the teacher and every candidate side by side (``python -m flows.compare``).

Separate evaluations, minutes apart, pick up the machine's drift; this one runs every batch
through every model back to back, so the speed ratios in ``metrics/comparison.json`` are like
for like. ``--with-peers`` adds the peer tools' models of benchmarks/peers.py (``models/peers/*``)
that were made from the current teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from bertshrink.errors import MissingArtifactError
from bertshrink.modelfolder.files import CONFIG_FILE
from bertshrink.modelfolder.peers import current_peers
from flows._cli import candidate_names, run_stage
from tasks.evaluate import compare_latency_task
from tracking.runs import stage_run


def models_to_compare(params: Params, with_peers: bool = False) -> list[str]:
    """The teacher, the floor (if trained), each recipe's (and search member's) candidate on disk, then
    (with ``with_peers``) the peer folders made from this teacher."""
    paths = Artifacts(params.base)
    if not (paths.teacher / CONFIG_FILE).is_file():
        raise MissingArtifactError(f"{paths.teacher} has no model: train the teacher first "
                                   "(`python -m flows.teacher` or `dvc repro teacher`).")
    floor = [paths.floor] if params.floor.enabled else []
    candidates = floor + [paths.candidate(name) for name in candidate_names(params)]
    dirs = [str(paths.teacher), *(str(d) for d in candidates if (d / CONFIG_FILE).is_file())]
    return dirs + ([str(d) for d in peers_of_this_teacher(paths)] if with_peers else [])


def peers_of_this_teacher(paths: Artifacts) -> list[Path]:
    """``models/peers/*`` made from the current teacher; a note for each one left out."""
    peers, skipped = current_peers(paths.peers_dir, paths.teacher)
    for name, why in skipped.items():
        print(f"bertshrink: note: peer {name} left out of the comparison: {why}.", file=sys.stderr)
    return peers


def peers_option(parser) -> None:
    parser.add_argument("--with-peers", dest="with_peers", action="store_true",
                        help="also time the peer tools' models (benchmarks/peers.py) made from this teacher")


@flow(name="compare")
def compare_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None,
                 with_peers: bool = False) -> dict:
    """Interleaved latency of ``model_dirs`` (default: teacher + existing candidates, + peers with
    ``with_peers``), teacher first."""
    dirs = model_dirs or models_to_compare(params, with_peers)
    with stage_run("compare", params.registry, parent_run_id) as run_id:
        return compare_latency_task([str(Path(d)) for d in dirs], params.evaluate, Artifacts(params.base),
                                    params.base.seed, run_id, baseline=params.compress.baseline)


if __name__ == "__main__":
    run_stage(compare_flow, __doc__, extra=peers_option, cli_args=("with_peers",))
