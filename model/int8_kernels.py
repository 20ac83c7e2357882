"""Is this process's int8 matrix multiply exact? Which quantisation range keeps it so? Asked of the kernel itself.

int8 serving ends in int8 x int8 -> int32 products (torch._int_mm, what torchao's dynamic int8 Linear and its
compiled form call). With VNNI or AMX (vpdpbusd, tdpbssd) the CPU accumulates in int32 and the product is exact.
Without them (ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2 on this machine, or a CPU that lacks VNNI) the
kernel multiplies byte pairs with vpmaddubsw, which sums two u8 x s8 products into a *saturating int16*: full-range
products come out wrong, and it is the weights (the second operand) that overflow; with the weights in half the
range every product is exact. So int8 on such a CPU is faithful only with a reduced range: torchao's
`reduce_range` (7-bit weights and activations, FBGEMM's long-standing remedy), which is what `int8_reduce_range`
asks for. The measurements (wrong products, and int8's agreement with float32 before and after) are in
docs/trust.md, "bfloat16 and int8 answer what float32 answers"; tests/model/test_int8_kernels.py runs the checks
in a subprocess under that setting.

Detection is by the kernel path actually taken, not by the CPU's flags: torchao's own `should_reduce_range` reads
the hardware's VNNI flag, which stays true when ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA select the AVX2 kernels.
A probe of a few microseconds runs the worst case (all 127) through `torch._int_mm` once per process and device;
the capability, ISA setting and flags are reported with it so a refusal can say why.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from model.precision import cpu_flags

# CPU flags (Linux names) with an int32-accumulating int8 dot product.
INT8_DOT_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# The probe's shape: K must span several of the kernel's byte pairs and blocks; M, N the smallest _int_mm accepts
# on every device (CUDA wants multiples of 8, rows > 16).
_M, _K, _N = 32, 64, 32


class Int8Unfaithful(ValueError):
    """int8 matrix multiplies on this device are wrong even with the reduced range: int8 must not be served."""


@dataclass(frozen=True)
class Int8KernelReport:
    device: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): the ATen kernels chosen ("AVX512", "AVX2", ...)
    onednn_isa: str  # ONEDNN_MAX_CPU_ISA as set ("" when unset: oneDNN's best)
    dot_flags: tuple[str, ...]  # the CPU's int32-accumulating int8 dot-product flags, if any
    exact_full_range: bool  # int8 operands in [-127, 127] multiply exactly
    exact_reduced_range: bool  # operands in [-64, 63] (torchao's reduce_range) multiply exactly

    @property
    def reduce_range(self) -> bool:
        return not self.exact_full_range

    def why(self) -> str:
        setting = f"ATen capability {self.capability}, ONEDNN_MAX_CPU_ISA={self.onednn_isa or 'unset'}"
        flags = ", ".join(self.dot_flags) or "none"
        return (
            f"this {self.device}'s int8 matrix multiply ({setting}; int8 dot-product flags: {flags}) gave wrong "
            "full-range int8 products in a probe: without VNNI/AMX kernels byte pairs add up in saturating int16"
        )


def _probe(device: torch.device, low: int, high: int) -> bool:
    """int8 operands in [low, high] through torch._int_mm, against exact int64: the worst case (activations all at
    `high`, weight columns all at `high` and all at `low`: the largest pair sums) and a random case."""
    gen = torch.Generator().manual_seed(0)
    a = torch.cat([torch.full((_M, _K), high), torch.randint(low, high + 1, (_M, _K), generator=gen)])  # (2M, K)
    b = torch.randint(low, high + 1, (_K, _N), generator=gen)  # (K, N)
    b[:, 0], b[:, 1] = high, low
    a, b = a.to(torch.int8), b.to(torch.int8)
    try:
        got = torch._int_mm(a.to(device), b.to(device)).cpu().long()
    except RuntimeError:  # no int8 kernel on this device at all
        return False
    return bool(torch.equal(got, a.long() @ b.long()))


@functools.cache
def int8_kernel_report(device: str = "cpu") -> Int8KernelReport:
    """What this process's int8 matmul does on `device` (cached: the kernel choice is fixed at process start)."""
    dev = torch.device(device)
    capability = torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else dev.type
    return Int8KernelReport(
        device=dev.type,
        capability=capability,
        onednn_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        dot_flags=tuple(sorted(cpu_flags() & INT8_DOT_CPU_FLAGS)) if dev.type == "cpu" else (),
        exact_full_range=_probe(dev, -127, 127),  # torchao's symmetric int8 range
        exact_reduced_range=_probe(dev, -64, 63),  # its reduce_range: quant_min // 2, quant_max // 2
    )


def int8_reduce_range(device: torch.device) -> bool:
    """True when int8 needs torchao's reduced range on `device` to stay exact; raises Int8Unfaithful (with the
    reason) when not even that is exact, so int8 is refused rather than served wrong."""
    report = int8_kernel_report(str(device.type))
    if not report.exact_full_range and not report.exact_reduced_range:
        raise Int8Unfaithful(
            f"int8 refused: {report.why()}, and even the reduced range was wrong here; serve float32 or bfloat16"
        )
    return report.reduce_range


__all__ = ["INT8_DOT_CPU_FLAGS", "Int8KernelReport", "Int8Unfaithful", "int8_kernel_report", "int8_reduce_range"]
