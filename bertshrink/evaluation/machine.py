"""The machine a figure was measured on: CPU model, cores, the CPU features int8 and bf16 speed
depend on, and library versions, so runs on different hardware are never compared blindly."""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

# CPU features that decide int8 / bf16 speed; cpuinfo spells VNNI both ways across versions.
CPU_FLAGS = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx512_bf16": ("avx512_bf16",),
    "amx_tile": ("amx_tile",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "arm_dotprod": ("asimddp", "dotprod"),
}


@functools.lru_cache(maxsize=1)
def _cpu_info() -> dict:
    # py-cpuinfo takes ~1 s (it may spawn a subprocess), so ask once per process.
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception as err:  # noqa: BLE001 - machine info must never fail an evaluation
        log.warning("py-cpuinfo failed (%s); falling back to platform", err)
        return {}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - optional dependency
        return None


def machine_info(threads: int) -> dict:
    """CPU, core counts, int8-relevant CPU flags and library versions, for comparing runs."""
    import psutil

    info = _cpu_info()
    flags = {f.lower() for f in info.get("flags", [])}
    return {
        "cpu_model": info.get("brand_raw") or platform.processor() or platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "threads": threads,
        "cpu_flags": {name: any(s in flags for s in spellings)
                      for name, spellings in CPU_FLAGS.items()},
        "torch": torch.__version__,
        "torch_quantized_engine": torch.backends.quantized.engine,
        "onnxruntime": _version("onnxruntime"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def cpu_features(machine: Mapping[str, Any]) -> str:
    """The CPU features int8 speed depends on (onnxruntime #6695), as 'avx2 yes, avx512_vnni yes, amx_int8 no'."""
    flags = machine.get("cpu_flags", {})
    return ", ".join(f"{name} {'yes' if flags.get(name) else 'no'}" for name in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"))
