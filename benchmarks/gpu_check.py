"""GPU check: fine-tune the teacher and run one distillation on CUDA, and report the times.

``python benchmarks/gpu_check.py [--params params.yaml] [--recipe distill-3l] [--processes N] [--out FILE]``

For when a GPU machine is at hand; not part of ``make test``. It refuses to run without a CUDA
device. Everything goes to a temporary folder (``models/`` and MLflow are not touched): the data
of ``params.yaml`` (``data/prepared`` when present, else prepared from ``data.source``), its
teacher section with ``precision: auto`` (bf16 autocast where supported, as the teacher stage
trains), then the first distill step of ``--recipe`` (default: the first recipe with one). With
``--processes`` N > 1 both run under torchrun (DDP on N GPUs, nccl). Prints one JSON report:
device, versions, precision, per-stage seconds, examples per second and accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repository root

from bertshrink.config.artifacts import Artifacts  # noqa: E402
from bertshrink.config.knobs import DistributedKnobs  # noqa: E402
from bertshrink.config.params import Params, load_params  # noqa: E402
from bertshrink.config.recipes import DistillStep  # noqa: E402
from bertshrink.data.prepare import PreparedData, load_prepared, prepare_splits  # noqa: E402
from bertshrink.data.sources import load_raw_dataset  # noqa: E402
from bertshrink.training.distill import distill  # noqa: E402
from bertshrink.training.finetune import TrainResult, pick_device_and_precision, train_teacher  # noqa: E402

NO_GPU = ("gpu_check: no CUDA device is visible here (torch.cuda.is_available() is False; torch {version}). "
          "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")


def require_gpus(processes: int) -> int:
    """The number of GPUs; exits with a clear message (code 2) when there are none or too few."""
    if not torch.cuda.is_available():
        sys.exit(NO_GPU.format(version=torch.__version__))
    gpus = torch.cuda.device_count()
    if processes > gpus:
        sys.exit(f"gpu_check: --processes {processes} needs {processes} GPUs; {gpus} visible.")
    return gpus


def prepared_data(params: Params) -> PreparedData:
    folder = Artifacts(params.base).prepared
    if folder.is_dir():
        return load_prepared(folder)
    raw = load_raw_dataset(params.data.source, params.data.text_column, params.data.label_column,
                           params.data.split_names)
    return prepare_splits(raw, params.data, params.base.seed)


def first_distill_step(params: Params, recipe: str | None) -> tuple[str, DistillStep]:
    recipes = params.compress.recipes
    names = [recipe] if recipe else list(recipes)
    for name in names:
        if name not in recipes:
            sys.exit(f"gpu_check: no recipe {name!r} in the params file; there are {', '.join(recipes)}.")
        step = next((s for s in recipes[name].steps if isinstance(s, DistillStep)), None)
        if step is not None:
            return name, step
    sys.exit(f"gpu_check: no distill step in {', '.join(names)}; name a recipe with one (--recipe).")


def timed(stage, *args, **kwargs) -> tuple[TrainResult, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = stage(*args, **kwargs)
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def stage_report(result: TrainResult, seconds: float) -> dict:
    metrics = result.metrics
    return {"seconds": round(seconds, 2), "train_runtime_s": metrics.get("train_runtime"),
            "train_samples_per_second": metrics.get("train_samples_per_second"),
            "eval_accuracy": metrics.get("eval_accuracy"), "device": result.device,
            "world_size": result.distributed.get("world_size"),
            "trained_module": result.distributed.get("trained_module"),
            "teacher_module": result.distributed.get("teacher_module")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--recipe", help="the recipe whose first distill step runs (default: the first with one)")
    parser.add_argument("--processes", type=int, default=1, help="DDP processes, one per GPU (default 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    gpus = require_gpus(args.processes)
    params = load_params(args.params)
    recipe, step = first_distill_step(params, args.recipe)
    prepared = prepared_data(params)
    distributed = DistributedKnobs(processes=args.processes)
    teacher = params.teacher.model_copy(update={"resume": False})
    _, precision_flags = pick_device_and_precision(teacher.precision)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        trained, teacher_s = timed(train_teacher, prepared, teacher, root / "teacher", root / "ckpt-teacher",
                                   params.base.seed, distributed=distributed)
        distilled, distill_s = timed(distill, trained.model_dir, prepared, step, root / "student", root / "ckpt-student",
                                     max_length=teacher.max_length, seed=params.base.seed, distributed=distributed)
    report = {
        "gpu": torch.cuda.get_device_name(0), "gpus_visible": gpus, "processes": args.processes,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "precision": next((name for name, on in precision_flags.items() if on), "fp32"),
        "train_rows": len(prepared.splits["train"]), "teacher_model": teacher.model,
        "teacher": stage_report(trained, teacher_s), "distill": {"recipe": recipe, **stage_report(distilled, distill_s)},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
