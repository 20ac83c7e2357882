"""What a heatmap costs: ms per image for the plain forward (SDPA), attention rollout and gradient rollout.

    .venv/bin/python bench/heatmap_cost.py                          # ti16 and s16, batch 1 and 8, 1 thread, CPU
    .venv/bin/python bench/heatmap_cost.py --variants b16 --batch-sizes 1 --threads 2

Each path is what Classifier.forward runs under Classifier.predict's torch.inference_mode: `model(images)` for
images without a heatmap, model.explain.heatmaps with the service's "rollout" (explicit-attention forward + rollout)
or "gradient" (the same forward with autograd recording, a backward pass to every block's attention, the gradient
rollout); "plain-rollout" is rollout without discarding (the service's map before heatmap_method), for reference.
The paths are timed in interleaved repeats (the order rotating each repeat) and the median is reported, by wall
clock and by this process's CPU time (which ignores waiting for a core on a shared machine). Random weights (with a
random head, so the gradients are not zero): the cost does not depend on what the weights are.
Prints a table and writes results/heatmap_cost.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from model.config import get_config
from model.explain import PLAIN_ROLLOUT, SERVICE_METHODS, heatmaps
from model.vit import ViT

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def paths(model: ViT, images: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The three things the predictor can run on a batch, by name."""
    return {
        "plain": lambda: model(images).softmax(-1),
        "plain-rollout": lambda: heatmaps(model, images, [PLAIN_ROLLOUT]),  # the service's map before, for reference
        "rollout": lambda: heatmaps(model, images, [SERVICE_METHODS["rollout"]]),
        "gradient": lambda: heatmaps(model, images, [SERVICE_METHODS["gradient"]]),
    }


def time_once(fn: Callable[[], object], iters: int) -> dict[str, float]:
    """Seconds per call by each clock."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    for _ in range(iters):
        fn()
    return {name: (clock() - start[name]) / iters for name, clock in CLOCKS.items()}


def bench(variant: str, batch: int, repeats: int, iters: int) -> dict[str, dict[str, float]]:
    """{path: {"wall_ms", "cpu_ms"}} per image, medians over the repeats."""
    torch.manual_seed(0)
    model = ViT(get_config(variant, num_classes=37)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    runs = paths(model, images)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    with torch.inference_mode():  # as Classifier.predict; the gradient path turns autograd back on inside
        for fn in runs.values():
            fn()  # warm-up: oneDNN primitives, allocator, autograd's first graph
        names = list(runs)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(time_once(runs[name], iters))
    return {
        name: {f"{clock}_ms": 1000 * statistics.median(s[clock] for s in runs_) / batch for clock in CLOCKS}
        for name, runs_ in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["ti16", "s16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared box)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="calls per timing")
    parser.add_argument("--out", type=Path, default=Path("results/heatmap_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    header = f"{'variant':<8} {'batch':>5} {'path':<13} {'wall ms/img':>11} {'cpu ms/img':>10}"
    print(f"{header} {'x plain':>8} {'x rollout':>9}")
    for variant in args.variants:
        for batch in args.batch_sizes:
            result = bench(variant, batch, args.repeats, args.iters)
            for name, ms in result.items():
                vs_plain = ms["cpu_ms"] / result["plain"]["cpu_ms"]
                vs_rollout = ms["cpu_ms"] / result["rollout"]["cpu_ms"]
                rows.append({"variant": variant, "batch": batch, "path": name, **ms, "cpu_x_plain": vs_plain})
                print(
                    f"{variant:<8} {batch:>5} {name:<13} {ms['wall_ms']:>11.1f} {ms['cpu_ms']:>10.1f} "
                    f"{vs_plain:>7.2f}x {vs_rollout:>8.2f}x"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    args.out.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
