"""One dtype vocabulary and one rule for choosing it: serving, training, evaluation and the benches all use this.

Names are torch's own (`float32`, `bfloat16`, `float16`); the short forms people type (`fp32`, `bf16`, `fp16`)
mean the same. `auto` is the rule: bfloat16 wherever it is the faster dtype, float32 elsewhere.
- CUDA: tensor cores run bfloat16 at several times float32's rate.
- CPUs: only those with AVX512-BF16 or AMX execute bfloat16 natively (without them PyTorch emulates it through
  float32), and even there the build's kernels decide: the flags are necessary, and a quarter-second matmul
  measurement at first use decides (cpu_bf16_pays).
- Anything else (MPS): float32.
Classification accuracy does not notice: the tests require >= 99 % top-1 agreement with float32 on held-out data.

Serving casts the weights to the chosen dtype (`resolve_dtype`). Training and evaluation keep float32 weights and
run the forward under autocast (`autocast_dtype`, None when that is float32), so the optimiser still updates
float32 master weights.

`int8` is the one quantised name, and it is for inference only (serving, evaluation): model/inference.py quantises a
float32 model's Linear layers at load time (int8 weights, int8 activations scaled per token as they arrive). It is
never a compute dtype: `resolve_dtype` and `autocast_dtype` refuse it, so training, which asks them, refuses it too.
`auto` never picks it: int8 changes the model's answers slightly, and that is the operator's call.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What a command line or a setting accepts: "auto", torch's names and the short forms.
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES, *ALIASES)
# Training autocasts to bfloat16 or not at all: float16 would need loss scaling (a GradScaler) to keep small
# gradients from underflowing, and bfloat16 has float32's range without it.
TRAINING_DTYPE_CHOICES: tuple[str, ...] = tuple(c for c in DTYPE_CHOICES if c not in ("float16", "fp16"))
# Quantised names: weights stored in a narrower integer type, computed by model/inference.py, never by a cast.
QUANTISED_DTYPES: tuple[str, ...] = ("int8",)
# What serving and evaluation accept: every compute dtype plus the quantised ones.
INFERENCE_DTYPE_CHOICES: tuple[str, ...] = (*DTYPE_CHOICES, *QUANTISED_DTYPES)


def canonical_dtype(name: str) -> str:
    """ "auto", torch's name for `name` ("bf16" -> "bfloat16") or a quantised name ("int8"); ValueError naming the
    choices otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key != "auto" and key not in DTYPES and key not in QUANTISED_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(INFERENCE_DTYPE_CHOICES)}")
    return key


def is_quantised(name: str) -> bool:
    """True for a quantised inference dtype ("int8"), False for "auto" and the compute dtypes."""
    return canonical_dtype(name) in QUANTISED_DTYPES


# CPU flags (as Linux names them in /proc/cpuinfo) that mean bfloat16 matrix multiplies run in hardware.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags; empty where the file is missing (macOS, Windows) or unreadable.

    torch has no public query for bfloat16 support: torch.backends.cpu.get_cpu_capability() says "AVX512" on CPUs
    with and without AVX512-BF16, and oneDNN's own check accepts plain AVX512, which only emulates bfloat16."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 says flags, ARM says Features
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bfloat16 matrix multiplies natively (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


# bfloat16 must beat float32 by this much on the CPU's own matmul before "auto" takes it: below it the casts and the
# element-wise ops bfloat16 still runs in float32 eat the gain.
BF16_MIN_SPEEDUP = 1.2


def bf16_matmul_speedup(size: int = 512, repeats: int = 5) -> float:
    """float32 / bfloat16 time of a (size x 768) @ (768 x 768) product on this CPU: a ViT-B block's shape. CPU time
    of this thread, best of `repeats` interleaved runs, so other busy processes do not decide it."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, 768, generator=gen), torch.randn(768, 768, generator=gen)
    operands = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(repeats):
        for dtype, (x, w) in operands.items():
            torch.mm(x, w)  # a first call builds oneDNN's primitive: not what is being timed
            start = time.thread_time()
            for _ in range(4):
                torch.mm(x, w)
            best[dtype] = min(best[dtype], time.thread_time() - start)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


@functools.cache
def cpu_bf16_pays() -> bool:
    """bfloat16 is the faster dtype on this CPU: native bfloat16 flags (necessary, not sufficient) and a measured
    matmul speed-up of at least BF16_MIN_SPEEDUP (about a quarter of a second, once per process).

    Measured, not assumed: machines of one kind (2-core AVX512-BF16) measured bfloat16 both slower and more than
    twice as fast as float32 (README, "Measured"), so the flags alone cannot decide."""
    return cpu_has_native_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def auto_dtype(device: torch.device) -> torch.dtype:
    """The rule behind "auto": bfloat16 on CUDA and on CPUs where it measures faster, float32 elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_pays()):
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to compute in on `device`: the rule for "auto", else the named dtype. A quantised name is refused
    (ValueError): it is no compute dtype, and model/inference.py → prepare_for_inference is what serves it."""
    key = canonical_dtype(name)
    if key in QUANTISED_DTYPES:
        raise ValueError(
            f"{key} is a quantised dtype for inference only (serving, evaluation), not a dtype to compute or "
            f"train in; choose one of {', '.join(DTYPE_CHOICES)}"
        )
    return auto_dtype(device) if key == "auto" else DTYPES[key]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype for torch.autocast on `device`, or None when the rule says float32 (autocast off)."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how /readyz, /v1/model, logs and bench tables name a dtype."""
    return str(dtype).removeprefix("torch.")
