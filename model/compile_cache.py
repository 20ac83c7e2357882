"""A compile cache that is only reused where its kernels are right, and the check that a compiled forward is.

Inductor's own cache does not tell CPU kernel settings apart: a cache filled under one ISA setting gave compiled
outputs off by 1.7e5, and a heap-corruption crash, under another, on one machine. So a kept cache (a compose or
Kubernetes volume: docs/service.md) lives in a sub-folder named by everything that decides the kernels - torch and
torchao versions, the CPU model and flags, the ATen capability and the ISA settings in the environment, the GPU
and its compute capability - and a process only ever opens the folder of its own key.

And a kept cache is never trusted blindly: `check_agreement` runs the compiled (or int8) forward and eager float32
on a probe batch and says whether they agree within the dtype's tolerance; the service serves eager when not.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from model.precision import cpu_flags

# Environment settings that change which kernels torch, oneDNN or inductor choose.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "TORCHINDUCTOR_FREEZING")
# Relative L2 distance of the candidate's logits from eager float32's that still counts as agreeing: compiled
# float32 reorders sums (~1e-6 measured), bfloat16 rounds to 8 bits of mantissa (~1e-2), int8 to 7-8 bits per
# operand (~2e-2 on the digits model); a wrong kernel is off by orders of magnitude (1.7e5 in the case above).
TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.05, "int8": 0.15}
# Top-1 agreement on the probe is reported, not required: a random-init model (the benches) has near-flat logits
# whose order int8 may legitimately swap; the relative error is what tells a wrong kernel from rounding.


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def kernel_facts(device: torch.device) -> dict[str, object]:
    """Everything that decides the compiled kernels on `device`, as plain JSON-able values."""
    facts: dict[str, object] = {
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_flags": sorted(cpu_flags()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {name: os.environ.get(name, "") for name in KERNEL_ENV},
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["gpu_capability"] = list(torch.cuda.get_device_capability(device))
    return facts


def kernel_key(device: torch.device) -> str:
    """A short, readable folder name: torch version, capability, and a hash of every kernel fact."""
    facts = kernel_facts(device)
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    capability = facts.get("gpu_capability")  # CUDA only
    sm = "".join(str(part) for part in capability) if isinstance(capability, (list, tuple)) else ""
    where = f"cuda-sm{sm}" if device.type == "cuda" else "cpu"
    return f"torch{torch.__version__.split('+')[0]}-{where}-{str(facts['cpu_capability']).lower()}-{digest}"


def use_compile_cache(root: str | os.PathLike[str], device: torch.device) -> Path:
    """Point inductor (and Triton) at root/<kernel key>, creating it, with the facts written beside the kernels so
    an operator can see what filled it. Call before the first compile of the process."""
    folder = Path(root) / kernel_key(device)
    folder.mkdir(parents=True, exist_ok=True)
    facts = folder / "kernel_facts.json"
    if not facts.exists():
        facts.write_text(json.dumps(kernel_facts(device), indent=2, sort_keys=True))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    return folder


@dataclass(frozen=True)
class Agreement:
    """How a candidate forward (compiled, int8) compares with eager float32 on the probe batch."""

    dtype: str
    relative_error: float  # ||candidate - reference|| / ||reference|| over the logits
    top1_agreement: float  # share of probe images with the same top-1 class
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.relative_error <= TOLERANCE.get(self.dtype, 0.05)

    def why(self) -> str:
        verdict = "agrees with" if self.ok else "disagrees with"
        return (
            f"the {self.dtype} forward {verdict} eager float32 on the probe batch: relative error "
            f"{self.relative_error:.3g} (tolerance {TOLERANCE.get(self.dtype, 0.05):g}), top-1 agreement "
            f"{self.top1_agreement:.0%}{'' if self.finite else ', non-finite logits or a failed forward'}"
        )


def check_agreement(
    candidate: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor],
    probe: torch.Tensor,
    dtype: str,
) -> Agreement:
    """Run both forwards on `probe` (the same uint8 batch) and compare their logits in float32. A candidate that
    raises counts as disagreeing: a crash in a cached kernel must fall back to eager, not take the service down."""
    with torch.inference_mode():
        want = reference(probe).float().cpu()
        try:
            got = candidate(probe).float().cpu()
        except Exception:
            return Agreement(dtype, float("inf"), 0.0, finite=False)
    finite = bool(torch.isfinite(got).all())
    error = float((got - want).norm() / want.norm().clamp_min(1e-12)) if finite else float("inf")
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return Agreement(dtype, error, top1, finite)


def probe_batch(image_size: int, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """(batch, 3, S, S) uint8: smooth random images (low-frequency noise upsampled), closer to photos than white
    noise, the same in every process so a warm-up's verdict is reproducible."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 8, generator=gen)  # (B, 3, 8, 8)
    smooth = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")  # (B, 3, S, S)
    return (smooth * 255).round().to(torch.uint8)


__all__ = [
    "KERNEL_ENV",
    "TOLERANCE",
    "Agreement",
    "check_agreement",
    "kernel_facts",
    "kernel_key",
    "probe_batch",
    "use_compile_cache",
]
