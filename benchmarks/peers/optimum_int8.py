"""Optimum's own int8 recipe, run in its own venv (bench/.venvs/optimum): export with optimum's
exporter, then ``ORTQuantizer`` with ``AutoQuantizationConfig`` (dynamic int8, per-channel).

Standalone: imports nothing from bertshrink. Writes ``<out>/model.onnx`` and ``<out>/peer.json``
(tool versions, the quantization config, seconds); benchmarks/peers.py turns that into a model folder.

    python optimum_int8.py --teacher models/teacher --out /tmp/optimum-work
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from importlib.metadata import version
from pathlib import Path

TOOLS = ("optimum-onnx", "optimum", "transformers", "torch", "onnxruntime", "onnx")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def arch_config_name(machine: str, flags: set[str]) -> str:
    """Which ``AutoQuantizationConfig`` constructor fits this CPU (optimum's own names)."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def export(teacher: Path, onnx_dir: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(teacher), output=str(onnx_dir), task="text-classification", device="cpu", no_post_process=False)


def quantize(onnx_dir: Path, quant_dir: Path, config_name: str, per_channel: bool) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qconfig = getattr(AutoQuantizationConfig, config_name)(is_static=False, per_channel=per_channel)
    quantizer = ORTQuantizer.from_pretrained(str(onnx_dir), file_name="model.onnx")
    quantizer.quantize(save_dir=str(quant_dir), quantization_config=qconfig)
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
            for k, v in qconfig.__dict__.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, type=Path, help="a transformers classifier folder")
    parser.add_argument("--out", required=True, type=Path, help="work folder: model.onnx and peer.json go here")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default: per-channel, as ours)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_dir, quant_dir = args.out / "export", args.out / "quantized"
    config_name = arch_config_name(platform.machine(), cpu_flags())
    started = time.perf_counter()
    export(args.teacher, onnx_dir)
    exported = time.perf_counter()
    qconfig = quantize(onnx_dir, quant_dir, config_name, per_channel=not args.per_tensor)
    done = time.perf_counter()
    shutil.copyfile(quant_dir / "model_quantized.onnx", args.out / "model.onnx")
    record = {
        "tool": "optimum-onnx", "versions": {t: version(t) for t in TOOLS},
        "recipe": f"optimum.exporters.onnx.main_export + ORTQuantizer, AutoQuantizationConfig.{config_name}"
                  f"(is_static=False, per_channel={not args.per_tensor}): dynamic int8",
        "search": False, "quantization_config": qconfig,
        "seconds": {"export": round(exported - started, 2), "quantize": round(done - exported, 2),
                    "total": round(done - started, 2)},
    }
    (args.out / "peer.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"peer": "optimum", "seconds": record["seconds"]}))


if __name__ == "__main__":
    main()
