"""Matrix-multiply peak of this device per dtype: the ceiling the model benches are a fraction of.

    .venv/bin/python bench/matmul_peak.py                                   # CPU: float32, bfloat16, int8
    python3 bench/matmul_peak.py --device cuda --size 8192 --out results/gpu/matmul
    .venv/bin/python bench/matmul_peak.py --shapes b16 --batch 16           # + the GEMMs ViT-B/16 runs at batch 16

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

from model.config import get_config
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


def time_matmul(
    dtype: str, size: int, device: torch.device, repeats: int, warmup: int, shape: tuple[int, int, int] | None = None
) -> float:
    """Operations per second (2 * size^3 per product, or 2 * m * k * n for shape (m, k, n)), the median of
    `repeats` timed products."""
    m, k, n = shape or (size, size, size)
    a, b = operands(dtype, max(m, k, n), device)
    a, b = a[:m, :k].contiguous(), b[:k, :n].contiguous()
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
    return 2 * m * k * n / statistics.median(seconds)


def model_gemms(variant: str, batch: int) -> dict[str, tuple[int, int, int]]:
    """The (m, k, n) of each Linear in one encoder block of `variant` at `batch` images: m = batch x tokens rows,
    as the served model multiplies them (attention's own products are batched small matmuls, not counted here)."""
    config = get_config(variant)
    rows, d = batch * (config.num_patches + config.num_prefix_tokens), config.hidden_dim  # (B x T, D)
    return {"qkv": (rows, d, 3 * d), "proj": (rows, d, d), "fc1": (rows, d, config.mlp_dim),
            "fc2": (rows, config.mlp_dim, d)}  # fmt: skip


def shape_efficiency(
    dtype: str, peak: float, gemms: dict[str, tuple[int, int, int]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Each GEMM's ops/s as a fraction of the square peak, and the block's: its operations over its GEMMs' summed
    time at those speeds. No model runs its Linears faster than this, so no service beats this fraction of the
    ceiling either."""
    out, ops, seconds = {}, 0.0, 0.0
    for name, (m, k, n) in gemms.items():
        speed = time_matmul(dtype, 0, device, repeats, 2, shape=(m, k, n))
        out[name] = speed / peak
        ops, seconds = ops + 2 * m * k * n, seconds + 2 * m * k * n / speed
    out["block"] = ops / seconds / peak
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--size", type=int, help="matrix side (default 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--shapes", metavar="VARIANT", help="also time VARIANT's Linear GEMMs at --batch images")
    parser.add_argument("--batch", type=int, default=16, help="images per forward for --shapes")
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
        row = {"dtype": dtype, "ops_per_s": ops, "unit": unit}
        if args.shapes:
            gemms = model_gemms(args.shapes, args.batch)
            row["shape_efficiency"] = shape_efficiency(dtype, ops, gemms, device, args.repeats)
            detail = ", ".join(f"{k} {v:.2f}" for k, v in row["shape_efficiency"].items())
            print(f"{dtype:>9}: {ops / 1e12:8.2f} {unit}; {args.shapes} at batch {args.batch}, of the peak: {detail}")
        else:
            print(f"{dtype:>9}: {ops / 1e12:8.2f} {unit}")
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".json")
    shapes = None
    if args.shapes:
        shapes = {"variant": args.shapes, "batch": args.batch, "gemms": model_gemms(args.shapes, args.batch)}
    doc = {"device": name, "size": size, "torch": torch.__version__, "shapes": shapes, "results": rows}
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
