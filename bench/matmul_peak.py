"""Matrix-multiply peak of this device per dtype: the ceiling the model benches are a fraction of.

    .venv/bin/python bench/matmul_peak.py                                   # CPU: float32, bfloat16, int8
    python3 bench/matmul_peak.py --device cuda --size 8192 --out results/gpu/matmul

A square (size x size) @ (size x size) product, timed after warm-up (the median of --repeats), counted as
2 * size^3 operations. int8 goes through torch._int_mm (int8 x int8 -> int32: VNNI / AMX on CPUs, IMMA tensor
cores on GPUs), the kernel torchao's dynamic int8 quantisation ends in. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from model.precision import canonical_dtype


def operands(dtype: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if dtype == "int8":
        a = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=gen)
    else:
        torch_dtype = getattr(torch, canonical_dtype(dtype))
        a = torch.randn(size, size, generator=gen).to(torch_dtype)
        b = torch.randn(size, size, generator=gen).to(torch_dtype)
    return a.to(device), b.to(device)


def time_matmul(dtype: str, size: int, device: torch.device, repeats: int, warmup: int) -> float:
    """Operations per second (2 * size^3 per product), the median of `repeats` timed products."""
    a, b = operands(dtype, size, device)
    matmul = torch._int_mm if dtype == "int8" else torch.matmul

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        matmul(a, b)
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)
        sync()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--size", type=int, help="matrix side (default 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/matmul_peak"), help="path stem for .json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.size or (8192 if device.type == "cuda" else 2048)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}; {size}x{size}x{size}; torch {torch.__version__}")
    rows = []
    for dtype in args.dtypes:
        try:
            ops = time_matmul(dtype, size, device, args.repeats, args.warmup)
        except RuntimeError as err:  # e.g. an int8 kernel this build or device lacks
            print(f"{dtype:>9}: not available ({err})")
            continue
        unit = "TOP/s" if dtype == "int8" else "TFLOP/s"
        print(f"{dtype:>9}: {ops / 1e12:8.2f} {unit}")
        rows.append({"dtype": dtype, "ops_per_s": ops, "unit": unit})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps({"device": name, "size": size, "torch": torch.__version__, "results": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
