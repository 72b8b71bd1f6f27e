"""Data-parallel training (DDP) under ``torchrun``: who may write, and how a stage is launched.

The calling process (a Prefect task, a test) stays one process: with ``distributed.processes``
N > 1 it writes a job file and runs ``python -m torch.distributed.run --standalone
--nproc_per_node N -m bertshrink.training.ddp_launch JOB`` as a subprocess, waits, and reads
the result rank 0 wrote. transformers' ``Trainer`` does the DDP part itself (it reads
``LOCAL_RANK``/``WORLD_SIZE``); the training code asks ``is_main_process()`` before any write
of its own, so checkpoints, the model folder and the result are written once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import bertshrink
from bertshrink.config.knobs import DistributedKnobs
from bertshrink.errors import TrainingError

LAUNCHER = "bertshrink.training.ddp_launch"
JOB_FILE, RESULT_FILE, LOG_FILE = "job.json", "result.json", "torchrun.log"
LOG_TAIL_LINES = 25
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- inside a torchrun process


def launched_by_torchrun() -> bool:
    """True in a process that torchrun / accelerate launch started (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def backend() -> str | None:
    """The process group's backend under DDP; None in one process."""
    return dist.get_backend() if is_distributed() else None


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in one process)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def keep_in_sync(module: torch.nn.Module) -> None:
    """Start ``module`` from rank 0's weights and average its gradients over the ranks on every
    backward pass.

    For trained parameters outside the DDP-wrapped model (the distillation projections): DDP
    does both only for the model it wraps, and unsynchronised copies would drift apart.
    """
    if not is_distributed():
        return
    ranks = world_size()
    with torch.no_grad():
        for parameter in module.parameters():
            dist.broadcast(parameter.data, src=0)

    def averaged(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / ranks

    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.register_hook(averaged)


def run_summary(examples_trained: int, trained_module: str, trained: list[torch.nn.Module],
                **extra: Any) -> dict[str, Any]:
    """What the run was, for the result and the tracking run: world size, backend, the training
    examples each rank saw (its shard), the type of module the Trainer trained (DDP or not), and
    the sum of the trained weights on each rank (equal when the replicas stayed in sync)."""
    weights = float(sum(p.detach().double().sum().item() for module in trained for p in module.parameters()))
    return {"world_size": world_size(), "backend": backend(), "examples_per_rank": gather(int(examples_trained)),
            "trained_module": trained_module, "weight_sum_per_rank": gather(weights), **extra}


def init_process_group(backend: str) -> None:
    """Join the group torchrun set up; on nccl each rank takes the GPU of its local rank."""
    if not launched_by_torchrun():
        return  # run as a plain process (a job rerun by hand): one process, no group
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)


def finish_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- the calling process


def wants_torchrun(knobs: DistributedKnobs | None) -> bool:
    """More than one process asked for, and this is not already one of torchrun's."""
    return knobs is not None and knobs.processes > 1 and not launched_by_torchrun()


def resolve_backend(knobs: DistributedKnobs, gpus: int) -> str:
    """auto: nccl with GPUs, gloo without; nccl without (enough) GPUs is refused."""
    backend = knobs.backend if knobs.backend != "auto" else ("nccl" if gpus else "gloo")
    if backend == "nccl" and gpus < knobs.processes:
        raise TrainingError(
            f"distributed.backend {backend} with distributed.processes {knobs.processes} needs "
            f"{knobs.processes} CUDA GPUs; {gpus} visible here. Set distributed.processes to at most {gpus}"
            + (" or backend gloo (CPU processes)." if gpus == 0 else ".")
        )
    return backend


def job_folder(work_dir: Path) -> Path:
    """Where a launched stage keeps its job, result and log: beside its work folder, which the
    stage itself clears, and kept after a failure for the log."""
    work_dir = Path(work_dir)
    return work_dir.with_name(f"{work_dir.name}.ddp")


def run_under_torchrun(stage: str, job: dict[str, Any], knobs: DistributedKnobs, work_dir: Path) -> dict[str, Any]:
    """Run ``stage`` (a name ``ddp_launch`` knows) with ``job``'s arguments in ``knobs.processes``
    processes; returns the result rank 0 wrote. Raises ``TrainingError`` naming the stage and the log."""
    backend = resolve_backend(knobs, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    folder = job_folder(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    job_file, result_file, log_file = folder / JOB_FILE, folder / RESULT_FILE, folder / LOG_FILE
    result_file.unlink(missing_ok=True)  # an old result must not pass for this run's
    job_file.write_text(json.dumps({"stage": stage, "backend": backend, "arguments": job}, indent=2, default=str))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(knobs.processes), "-m", LAUNCHER, str(job_file)]
    log.info("%s: DDP on %d processes (%s): %s; log in %s", stage, knobs.processes, backend, " ".join(command), log_file)
    code, tail = _run_logged(command, log_file)
    if code != 0 or not result_file.is_file():
        raise TrainingError(
            f"{stage}: DDP training on {knobs.processes} processes ({backend}) failed with exit code {code}; "
            f"the model folder is replaced only once every rank has finished, so a failed run leaves the last one. "
            f"Every rank's output is in {log_file}; its last lines:\n"
            + "".join(tail)
        )
    return json.loads(result_file.read_text())


def _child_environment() -> dict[str, str]:
    """The processes import this same library, wherever the caller found it."""
    env = dict(os.environ)
    root = str(Path(bertshrink.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_logged(command: list[str], log_file: Path) -> tuple[int, list[str]]:
    """Run ``command``; its output goes to ``log_file`` and to stderr. (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    with open(log_file, "w", encoding="utf-8") as out, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            env=_child_environment()) as process:
        for line in process.stdout:
            out.write(line)
            sys.stderr.write(line)
            tail.append(line)
        code = process.wait()
    return code, list(tail)
