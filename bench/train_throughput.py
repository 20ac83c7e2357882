"""Training throughput: `finetune` train-step img/s and `linear-probe` feature-extraction img/s.

Synthetic uint8 batches through our ViT at the variant's real shape (random init: same FLOPs as the ImageNet
weights, and nothing to download). A train step is training/epoch.py's own (forward, loss, backward, clipping,
AdamW update; autocast when --dtype bf16); extraction is the no-grad backbone forward the linear probe caches.

    .venv/bin/python bench/train_throughput.py                                  # CPU, b16, short
    .venv/bin/python bench/train_throughput.py --device cuda --dtype bf16 --batch-size 64 --steps 20

Prints a table, writes results/train_throughput.png and .json. Data loading (JPEG decode + augmentation) is
not included: on a GPU give the DataLoader enough --workers that it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import get_config
from model.inference import batch_outputs
from model.precision import TRAINING_DTYPE_CHOICES, autocast_dtype, canonical_dtype
from model.vit import ViT
from training.epoch import LRSchedule, Optimization, Runtime, train_one_epoch
from training.recipes import RECIPE_DEFAULTS, parameter_groups

PETS_TRAINVAL_IMAGES = 3680  # Oxford-IIIT Pet trainval
PETS_TRAIN_IMAGES = 3312  # trainval minus the 10 % held-out validation slice: what one finetune epoch sees
PETS_TEST_IMAGES = 3669
# The linear probe extracts train, validation and test features once: every Pets image.
PETS_ALL_IMAGES = PETS_TRAINVAL_IMAGES + PETS_TEST_IMAGES


@dataclass
class Result:
    mode: str  # "finetune train step" | "linear-probe extraction"
    variant: str
    device: str
    dtype: str
    batch_size: int
    images_per_s: float
    seconds_per_pets_epoch: float
    peak_memory_gb: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device, warmup: int, steps: int, desc: str) -> float:
    """Seconds per step after `warmup` untimed steps (first calls pay for allocation and kernel selection)."""
    for _ in tqdm(range(warmup), desc=f"{desc} warmup", leave=False):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_finetune(model: ViT, batch: int, device: torch.device, amp: torch.dtype | None, warmup: int, steps: int):
    cfg = RECIPE_DEFAULTS["finetune"]  # label smoothing, clipping, weight decay as the recipe trains
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    # One step per call at the peak LR (no warmup over a 1-step schedule), no bar: only the step is timed.
    opt = Optimization(optimizer, LRSchedule(cfg.lr, cfg.min_lr, 1, 0), cfg.label_smoothing, cfg.grad_clip)
    env = Runtime(device, amp)
    size = model.config.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    targets = torch.randint(0, model.config.num_classes, (batch,), device=device)

    def step() -> None:  # the training loop's own step, one batch at a time
        train_one_epoch(model, [(images, targets)], opt, 0, env, desc=None)

    return _timed(step, device, warmup, steps, "finetune")


def bench_extract(model: ViT, batch: int, device: torch.device, amp: torch.dtype | None, warmup: int, steps: int):
    model.eval()
    size = model.config.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

    @torch.inference_mode()
    def step() -> None:
        batch_outputs(model, images, amp)  # the linear probe's feature pass (training/features.py)

    return _timed(step, device, warmup, steps, "extract")


def plot(results: list[Result], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [f"{r.mode}\n{r.variant} {r.device} {r.dtype} b{r.batch_size}" for r in results]
    bars = ax.barh(names, [r.images_per_s for r in results], color=["tab:orange", "tab:blue"][: len(results)])
    for bar, r in zip(bars, results, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.images_per_s:.1f} img/s", va="center")
    ax.set_xlabel("images / second (higher is better)")
    ax.set_title(f"petvit training throughput — {note}", fontsize=9)
    ax.set_xlim(0, max(r.images_per_s for r in results) * 1.35)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", choices=TRAINING_DTYPE_CHOICES, default="float32", help="bfloat16 = autocast, as training"
    )
    parser.add_argument("--batch-size", type=int, help="default 8 on CPU, 64 on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--only", choices=("finetune", "extract"), help="run one of the two measurements")
    parser.add_argument("--out", type=Path, default=Path("results/train_throughput.png"))
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    amp = autocast_dtype(args.dtype, device)
    args.dtype = canonical_dtype(args.dtype)
    torch.manual_seed(0)
    model = ViT(get_config(args.variant, num_classes=37)).to(device)

    results = []
    runs = (("finetune", "finetune train step", bench_finetune), ("extract", "linear-probe extraction", bench_extract))
    for key, mode, fn in runs:
        if args.only and args.only != key:
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = fn(model, batch, device, amp, args.warmup, steps)
        ips = batch / seconds
        images = PETS_TRAIN_IMAGES if mode.startswith("finetune") else PETS_ALL_IMAGES
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        results.append(Result(mode, args.variant, str(device), args.dtype, batch, ips, images / ips, peak))

    cpu = platform.processor() or platform.machine()
    if device.type == "cpu":
        note = f"CPU {cpu}, torch threads={torch.get_num_threads()}, shared machine: noisy"
    else:
        note = torch.cuda.get_device_name(device)
    print(f"device: {device} ({note}); torch {torch.__version__}; {steps} timed steps after {args.warmup} warmup")
    print(f"{'mode':<26}{'variant':<8}{'dtype':<6}{'batch':>6}{'img/s':>10}{'s/Pets epoch':>14}{'peak GB':>9}")
    for r in results:
        peak = f"{r.peak_memory_gb:.1f}" if r.peak_memory_gb is not None else "-"
        print(
            f"{r.mode:<26}{r.variant:<8}{r.dtype:<6}{r.batch_size:>6}{r.images_per_s:>10.2f}"
            f"{r.seconds_per_pets_epoch:>14.0f}{peak:>9}"
        )
    print("(extraction 's/Pets epoch' = the one-off pass over train + val + test images the linear probe caches)")
    plot(results, args.out, note)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
