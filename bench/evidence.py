"""What every learning bench records and how it reports: the machine a figure came from (CPU model and flags, torch
version, the kernel setting), a measure over runs as mean [min, max], and a claim as "held in N of M runs".

A learning figure moves with the seed and with the CPU's rounding (issue 17: "hard distillation helps" flipped sign
between PyTorch's AVX512, AVX2 and portable kernels on one machine), so a bench that publishes one says where it
ran. scripts/kernels.sh sets the kernel setting (and PETVIT_KERNELS, read here); bench/kernels.py runs a bench under
all three and merges the runs.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

import torch

# The /proc/cpuinfo flags that decide which kernels PyTorch and oneDNN may pick (the rest are kept too, in "flags").
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
KERNEL_ENV = ("PETVIT_KERNELS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "TORCHINDUCTOR_CACHE_DIR")
CLAIM_SHARE = 0.8  # a claim holding in fewer than 80 % of runs is restated or withdrawn (issue 17)


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPU count and flags from /proc/cpuinfo (the platform's word for it where there is none)."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.split()
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "kernel_flags": [f for f in KERNEL_FLAGS if f in flags],
        "flags": flags,
    }


def kernel_setting() -> str:
    """native, avx2 or default as scripts/kernels.sh set it; otherwise read off ATEN_CPU_CAPABILITY."""
    if os.environ.get("PETVIT_KERNELS"):
        return os.environ["PETVIT_KERNELS"]
    return os.environ.get("ATEN_CPU_CAPABILITY", "native")


def machine() -> dict[str, Any]:
    """Everything about where a figure was measured that could change it."""
    return {
        "cpu": cpu_info(),
        "kernels": kernel_setting(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),  # what PyTorch actually dispatches to
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of a measure over runs."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def held(outcomes: list[bool]) -> dict[str, Any]:
    """How often a claim held: N of M runs, and whether that is often enough to publish it as it stands."""
    n, m = sum(bool(o) for o in outcomes), len(outcomes)
    return {"held": n, "runs": m, "share": n / m if m else 0.0, "stands": m > 0 and n / m >= CLAIM_SHARE}


def mean_range(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def held_text(h: dict[str, Any]) -> str:
    return f"held in {h['held']} of {h['runs']} runs"
