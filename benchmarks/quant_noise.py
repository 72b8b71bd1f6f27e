"""Quant-Noise against plain post-training quantization (PTQ) on the same student.

Three versions of one student (by default the pipeline's teacher) are quantized the same ways:

- ``ptq``: the student as it is;
- ``finetune``: the student after the same extra training as Quant-Noise but without noise
  (the control: any gain of Quant-Noise over it is the noise, not the extra epoch);
- ``quant-noise``: the student after ``quant_noise`` training (Fan et al. 2020).

Each is scored on the test split in fp32, with its encoder weights rounded to scalar intN per
channel (simulated in PyTorch, the paper's setting), and as ONNX Runtime int4 (MatMulNBits) and
dynamic int8 models (exported by the recipe step, quantized by ``bertshrink.quantize_onnx``). Writes
``reports/quant_noise.json`` and ``reports/quant_noise.md``.

Run after the pipeline has prepared the data and trained the teacher:
    python benchmarks/quant_noise.py                              # BBC, params.yaml
    python benchmarks/quant_noise.py --params configs/sst2.yaml   # SST-2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from bertshrink.compression.recipe import run_recipe  # noqa: E402
from bertshrink.data.prepare import load_prepared  # noqa: E402
from bertshrink.config.artifacts import Artifacts  # noqa: E402
from bertshrink.evaluation.metrics import classification_metrics  # noqa: E402
from bertshrink.modelfolder.runners import open_model  # noqa: E402
from bertshrink.modelfolder.size import size_on_disk  # noqa: E402
from bertshrink.config.params import load_params  # noqa: E402
from bertshrink.training.quant_training import round_weights_  # noqa: E402
from bertshrink.compression.quantize_onnx import quantize_dynamic_onnx, quantize_int4_onnx  # noqa: E402
from bertshrink.config.recipes import Recipe  # noqa: E402

SIMULATED_BITS = (8, 4, 3)
RUNTIME_QUANTIZATIONS = {
    "ort-int4": lambda onnx, out: quantize_int4_onnx(onnx, out, block_size=32),
    "ort-int8-dynamic": lambda onnx, out: quantize_dynamic_onnx(onnx, out, per_channel=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--student", type=Path, help="model folder (default: the pipeline's teacher)")
    parser.add_argument("--epochs", type=float, default=1.0, help="extra training epochs (control and Quant-Noise)")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--p", type=float, default=0.5, help="Quant-Noise: share of blocks quantized per forward")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="Quant-Noise: bits of the noise")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="where the pipeline ran (holds data/ and models/)")
    parser.add_argument("--out", type=Path, help="output stem (default: <root>/reports/quant_noise)")
    args = parser.parse_args(argv)
    args.work = args.root / "checkpoints" / "quant_noise"
    args.out = args.out or args.root / "reports" / "quant_noise"
    return args


def training_recipes(args) -> dict[str, list | None]:
    train = {"method": "finetune", "epochs": args.epochs, "learning_rate": args.learning_rate}
    return {
        "ptq": None,
        "finetune": [{"finetune": {k: v for k, v in train.items() if k != "method"}}],
        "quant-noise": [{"quant_noise": {**train, "p": args.p, "bits": args.bits, "block_size": args.block_size}}],
    }


def accuracy(model_dir: Path, test, evaluate, round_bits: int | None = None) -> float:
    runner = open_model(model_dir, evaluate.threads)
    if round_bits:
        round_weights_(runner.model, round_bits)
    predictions = runner.predict(test["text"].tolist(), evaluate.eval_batch_size, evaluate.max_length)
    return classification_metrics(test["label"].to_numpy(), predictions, runner.num_labels)["accuracy"]


def build(name: str, steps: list, source: Path, prepared, params, args) -> Path:
    out = args.work / name
    if not out.is_dir():
        run_recipe(name, Recipe.model_validate(steps), source, prepared, out, args.work / f".work-{name}",
                   params.base.seed, params.evaluate.max_length)
    return out


def study(args) -> dict:
    params = load_params(args.params)
    prepared = load_prepared(args.root / Artifacts(params.base).prepared)
    student = args.student or args.root / Artifacts(params.base).teacher
    test, evaluate = prepared.splits["test"], params.evaluate
    rows = {}
    for variant, steps in training_recipes(args).items():
        started = time.perf_counter()
        trained = student if steps is None else build(variant, steps, student, prepared, params, args)
        row = {"fp32": accuracy(trained, test, evaluate), "train_seconds": round(time.perf_counter() - started)}
        for bits in SIMULATED_BITS:
            row[f"int{bits}-scalar"] = accuracy(trained, test, evaluate, round_bits=bits)
        onnx = build(f"{variant}-onnx", [{"export_onnx": {}}], trained, prepared, params, args)
        for name, quantize in RUNTIME_QUANTIZATIONS.items():
            folder = args.work / f"{variant}-{name}"
            quantize(onnx, folder)
            row[name] = accuracy(folder, test, evaluate)
            row[f"{name}_mb"] = round(size_on_disk(folder)["total_bytes"] / 1e6, 1)
        rows[variant] = row
        print(variant, json.dumps(row), flush=True)
    return {"params": str(args.params), "student": str(student), "test_rows": len(test),
            "quant_noise": {"p": args.p, "bits": args.bits, "block_size": args.block_size},
            "training": {"epochs": args.epochs, "learning_rate": args.learning_rate}, "results": rows}


def markdown(result: dict) -> str:
    columns = ["fp32", *(f"int{b}-scalar" for b in SIMULATED_BITS), *RUNTIME_QUANTIZATIONS]
    lines = [f"Test accuracy, {result['test_rows']} rows ({result['params']}); Quant-Noise {result['quant_noise']}, "
             f"training {result['training']}.", "",
             "| student | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, row in result["results"].items():
        lines.append(f"| {variant} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return main_with(parse_args(argv))


def main_with(args: argparse.Namespace) -> int:
    result = study(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
