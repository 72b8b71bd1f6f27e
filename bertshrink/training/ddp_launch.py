"""What each torchrun / accelerate process runs: one training stage, DDP, rank 0 writing.

The teacher and compress tasks start it themselves when ``distributed.processes`` > 1 (see
``ddp.run_under_torchrun``, which writes the job file). By hand, on a multi-GPU machine::

    torchrun --standalone --nproc_per_node 4 -m bertshrink.training.ddp_launch --params params.yaml
    accelerate launch --num_processes 4 -m bertshrink.training.ddp_launch --params params.yaml

trains the teacher of ``params.yaml`` into its ``models/teacher`` (no MLflow run: that is the
teacher stage's), and ``... -m bertshrink.training.ddp_launch checkpoints/teacher.ddp/job.json``
reruns a job a task wrote. Library code: no Prefect, no MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from bertshrink.config.artifacts import TEACHER, Artifacts
from bertshrink.config.knobs import DistributedKnobs
from bertshrink.config.params import TeacherParams, load_params
from bertshrink.config.recipes import DistillStep
from bertshrink.data.prepare import load_prepared
from bertshrink.training import ddp
from bertshrink.training.distill import distill
from bertshrink.training.finetune import TrainResult, train_teacher


def run_teacher(arguments: dict[str, Any]) -> TrainResult:
    return train_teacher(load_prepared(Path(arguments["prepared_dir"])), TeacherParams(**arguments["teacher"]),
                         Path(arguments["output_dir"]), Path(arguments["work_dir"]), arguments["seed"],
                         extra_meta=arguments.get("extra_meta") or None)


def run_distill(arguments: dict[str, Any]) -> TrainResult:
    optional = {name: Path(arguments[name]) if arguments.get(name) else None for name in ("student_dir", "logits_cache_dir")}
    return distill(Path(arguments["teacher_dir"]), load_prepared(Path(arguments["prepared_dir"])),
                   DistillStep.model_validate(arguments["step"]), Path(arguments["output_dir"]),
                   Path(arguments["work_dir"]), max_length=arguments["max_length"], seed=arguments["seed"], **optional)


STAGES: dict[str, Callable[[dict[str, Any]], TrainResult]] = {"teacher": run_teacher, "distill": run_distill}


def teacher_job(params_file: Path) -> tuple[dict[str, Any], Path]:
    """The teacher stage's job from a params file (the backend for this machine), and where its result goes."""
    params = load_params(params_file)
    paths = Artifacts(params.base)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = ddp.resolve_backend(DistributedKnobs(processes=processes, backend=params.distributed.backend), gpus)
    arguments = {"prepared_dir": str(paths.prepared), "teacher": params.teacher.model_dump(mode="json"),
                 "output_dir": str(paths.teacher), "work_dir": str(paths.checkpoints(TEACHER)), "seed": params.base.seed}
    return {"stage": "teacher", "backend": backend, "arguments": arguments}, ddp.job_folder(paths.checkpoints(TEACHER))


def write_result(result: TrainResult, folder: Path) -> None:
    """Rank 0's result, swapped in whole (the caller takes a missing file for a failed run)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{ddp.RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result.to_json(), indent=2, default=str))
    tmp.replace(folder / ddp.RESULT_FILE)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bertshrink.training.ddp_launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("job", nargs="?", type=Path, help="a job file a task wrote (<work folder>.ddp/job.json)")
    source.add_argument("--params", type=Path, help="train the teacher of this params file")
    return parser.parse_args(argv)


@record  # a failing rank's exception lands in torchrun's error summary, not only in its own output
def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    if args.params:
        job, folder = teacher_job(args.params)
    else:
        job, folder = json.loads(args.job.read_text()), args.job.parent
    ddp.init_process_group(job["backend"])
    try:
        result = STAGES[job["stage"]](job["arguments"])
        if ddp.is_main_process():
            write_result(result, folder)
    finally:
        ddp.finish_process_group()


if __name__ == "__main__":
    main()
