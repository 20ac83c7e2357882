"""Forward throughput of our ViT against torchvision's VisionTransformer, same weights, same run.

CPU (the issue's comparison; the default):
    .venv/bin/python bench/model_throughput.py --repeats 5
H100 / H200, bf16, batch 256, eager and compiled:
    .venv/bin/python bench/model_throughput.py --device cuda --dtype bf16 --batch-sizes 256 --variants b16
    .venv/bin/python bench/model_throughput.py --device cuda --dtype bf16 --batch-sizes 256 --variants b16 --compile

Both models are timed under torch.inference_mode in interleaved repeats (torchvision, ours, torchvision, ...,
the order flipping every repeat so neither always runs second), each timing a number of forwards calibrated to
take about --min-time seconds; the median of the repeats is reported. Ours receives images in 0..1 and normalises
them itself, torchvision receives them already normalised, so ours pays for the normalisation in these figures.
Prints a table, writes results/model_throughput.json and results/model_throughput.png (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from model.config import get_config
from model.convert.pretrained import from_torchvision
from model.precision import DTYPE_CHOICES, canonical_dtype, resolve_dtype


def build_pair(variant: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torchvision's VisionTransformer of the variant's shape with random weights, and our copy of it."""
    c = get_config(variant, num_classes=1000)
    torch.manual_seed(0)
    tv = VisionTransformer(c.image_size, c.patch_size, c.depth, c.num_heads, c.hidden_dim, c.mlp_dim)
    with torch.no_grad():
        tv.heads.head.weight.normal_(std=0.02)  # a zero head would make the logit check below meaningless
    ours = from_torchvision(tv.eval())
    return tv.to(device, dtype).eval(), ours.to(device, dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(fn: Callable[[], object], iters: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call. The cpu clock (this process's CPU time, all threads summed) ignores time spent waiting
    for a core, so on a shared machine it measures the work and not the neighbours; CUDA needs the wall clock."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    for _ in range(iters):
        fn()
    sync(device)
    return (now() - start) / iters


def bench_pair(
    variant: str, batch: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, object]:
    tv, ours = build_pair(variant, device, dtype)
    size = ours.config.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    normalised = ((images.float() - ours.mean.float()) / ours.std.float()).to(dtype)  # torchvision's input
    models = {"torchvision": (tv, normalised), "ours": (ours, images)}
    if args.compile:
        models = {name: (torch.compile(m, backend=args.compile_backend), x) for name, (m, x) in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        max_diff = (tv(normalised).float() - ours(images).float()).abs().max().item()
        iters: dict[str, int] = {}
        for name, (model, x) in models.items():
            for _ in range(args.warmup):  # first calls pay for allocation, kernel selection, compilation
                model(x)
            once = time_calls(lambda m=model, x=x: m(x), 1, device)
            iters[name] = max(1, math.ceil(args.min_time / max(once, 1e-6)))
        n = max(iters.values())  # the same number of calls for both keeps the comparison symmetric
        for r in range(args.repeats):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                model, x = models[name]
                seconds[name].append(time_calls(lambda m=model, x=x: m(x), n, device, args.clock))
    flops = ours.flops_per_image()  # `ours` is still the plain module; only models[...] is compiled
    row: dict[str, object] = {"variant": variant, "batch": batch, "iters_per_repeat": n, "max_abs_diff": max_diff}
    for name, times in seconds.items():
        median = statistics.median(times)
        row[f"{name}_img_s"] = batch / median
        row[f"{name}_tflop_s"] = batch * flops / median / 1e12
        row[f"{name}_spread"] = (max(times) - min(times)) / median  # how noisy this point was
    row["ratio"] = row["ours_img_s"] / row["torchvision_img_s"]
    row["gflop_per_image"] = flops / 1e9
    row["fraction_of_peak"] = row["ours_tflop_s"] / args.peak_tflops
    return row


def plot(rows: list[dict[str, object]], path: Path, title: str, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\nbatch {r['batch']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    width = 0.4
    ax.bar([i - width / 2 for i in x], [r["torchvision_img_s"] for r in rows], width, label="torchvision")
    ax.bar([i + width / 2 for i in x], [r["ours_img_s"] for r in rows], width, label="ours")
    for i, r in zip(x, rows, strict=True):
        top = max(r["torchvision_img_s"], r["ours_img_s"])
        ax.annotate(f"{r['ratio']:.2f}x", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"images per {'CPU-' if clock == 'cpu' else ''}second (log)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["ti16", "s16", "b16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="auto: bfloat16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend; `eager` traces without code generation (bench/gpu_figures.sh's CPU dry run)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds each timed repeat lasts at least")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: images per second; cpu: images per CPU-second, steadier on a shared CPU (use with --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=798.0, help="the device's peak, for the fraction")
    parser.add_argument("--out", type=Path, default=Path("results/model_throughput"), help="path stem for .json/.png")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = canonical_dtype(args.dtype)  # one spelling in the table, the JSON and the plot
    if device.type == "cuda" and args.clock != "wall":
        parser.error("--clock cpu cannot see GPU time; use the wall clock on CUDA")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a throughput user would enable for fp32
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device {name}; dtype {args.dtype}; compile {args.compile}; clock {args.clock}; torch {torch.__version__}")
    header = (
        f"{'variant':>7} {'batch':>5} {'torchvision img/s':>17} {'ours img/s':>11} {'ours/tv':>7} "
        f"{'GFLOP/img':>9} {'ours TFLOP/s':>12} {'of peak':>7} {'spread':>6} {'max|dlogit|':>11}"
    )
    print(header)
    rows = []
    for variant in args.variants:
        for batch in args.batch_sizes:
            row = bench_pair(variant, batch, args, device, dtype)
            rows.append(row)
            spread = max(row["ours_spread"], row["torchvision_spread"])
            print(
                f"{variant:>7} {batch:>5} {row['torchvision_img_s']:>17.1f} {row['ours_img_s']:>11.1f} "
                f"{row['ratio']:>7.2f} {row['gflop_per_image']:>9.2f} {row['ours_tflop_s']:>12.3f} "
                f"{row['fraction_of_peak']:>7.1%} {spread:>6.0%} {row['max_abs_diff']:>11.1e}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": name,
        "dtype": args.dtype,
        "compile": args.compile,
        "clock": args.clock,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "peak_tflops": args.peak_tflops,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    compiled = ", compiled" if args.compile else ""
    title = f"ViT forward, ours vs torchvision ({name}, {args.dtype}{compiled}, {args.clock} clock)"
    plot(rows, args.out.with_suffix(".png"), title, args.clock)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
