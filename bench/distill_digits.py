"""Does DeiT's distillation help a small ViT on little real data? A convnet teacher, then the same tiny ViT trained
alone and distilled from that teacher (hard and soft), same epochs, same seeds, scored on the same held-out images.

Data: scikit-learn's 1,797 real 8x8 handwritten digits, split by petvit itself (training.data.load_splits on an
ImageFolder tree, per class, seeded): --test-fraction (60 %) held out for the score, 10 % validation (unused here),
the rest trains: ~540 images, "little data". The images are decoded once; every epoch, petvit's own train transform
(`--augment light --no-hflip`: a RandomResizedCrop of the 8x8 original to --image-size, down to --min-crop-scale
of its area: strong augmentation for digits) crops each training image anew, and the teacher sees exactly the
augmented batch the student sees (DeiT). Test images go through petvit's eval transform.

The training step is petvit's own (training/epoch.py's train_one_epoch with an Optimization: AdamW, warmup + cosine,
label smoothing, clipping; training/distill.py's DistillationLoss and TwoHeads for the distilled student); only the
data loading is replaced by in-memory tensors (each PNG decoded once, not every epoch through a DataLoader: the
loading costs more than these tiny models' own compute). The student is scored after its last epoch (`petvit train`
would export the best epoch on the validation split). `petvit train --recipe distill` runs the same step through the
full loop (tests/training/test_distill.py).

    PYTHONPATH=. .venv/bin/python bench/distill_digits.py                        # the docs' table (~4 min, 1 core)
    PYTHONPATH=. .venv/bin/python bench/distill_digits.py --epochs 60 --seeds 0 1 2 3 4 --modes soft

Prints a table, writes results/distill_digits.png and .json (git-ignored). tests/training/test_distill_digits.py
runs a short version of the same comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.evidence import machine
from model.config import get_config
from model.convert.teachers import build_convnet
from model.vit import ViT
from training.data import DataConfig, batch_mixer, eval_transform, load_splits, train_transform
from training.distill import DistillationLoss, TwoHeads
from training.epoch import LRSchedule, Optimization, Runtime, train_one_epoch
from training.recipes import parameter_groups

MODES = ("hard", "soft")


@dataclass(frozen=True)
class Setting:
    """One comparison's settings: the data, the student both runs share, their training, and the teacher."""

    test_fraction: float = 0.6  # held out for the score; 10 % validation; the rest (~30 %) trains
    image_size: int = 16  # the 8x8 digits upscaled
    patch_size: int = 4  # a 4 x 4 grid of patches
    width: int = 64
    depth: int = 2
    heads: int = 4
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    min_crop_scale: float = 0.35  # RandomResizedCrop's smallest area, per image, every epoch
    mixup: bool = False  # MixUp/CutMix on top (the teacher then sees the mixed images)
    alpha: float = 0.5
    tau: float = 3.0
    arch: str = "twoconv"  # two conv layers and a linear head, or a torchvision convnet (random init): "resnet18"
    teacher_epochs: int = 10
    teacher_lr: float = 2e-3


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Digits:
    """petvit's split of the digits tree, decoded once: the training images as they are on disk, uint8
    (N, 3, 8, 8), for petvit's train transform to crop every epoch; the test images through its eval transform,
    uint8 (N, 3, S, S); (N,) labels each."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def make_digits_tree(root: Path) -> Path:
    """scikit-learn's digits as <root>/<digit>/<n>.png, RGB, ink 0..16 stretched to 0..255."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), "L").convert("RGB").save(folder / f"{i}.png")
    return root


def load_digits_split(root: Path, setting: Setting) -> Digits:
    splits = load_splits(DataConfig(dataset="folder", data_dir=str(root), test_fraction=setting.test_fraction))
    as_is = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])  # PIL -> uint8 (3, 8, 8)
    decoded = []
    for split, transform in ((splits.train, as_is), (splits.test, eval_transform(setting.image_size))):
        view = split.with_transform(transform)
        images, labels = zip(*(view[i] for i in range(len(view))), strict=True)
        decoded += [torch.stack(images), torch.tensor(labels)]  # list of (3, H, W) -> (N, 3, H, W); (N,)
    return Digits(*decoded)


class AugmentedBatches:
    """One epoch of shuffled batches, each image through petvit's train transform (`--augment light --no-hflip`:
    a RandomResizedCrop of the 8x8 original to S px, drawn from the global RNG, which fit() seeds), the last partial
    batch dropped as the training loop's DataLoader does."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, setting: Setting, generator: torch.Generator
    ) -> None:
        self.images, self.labels, self.batch_size, self.generator = images, labels, setting.batch_size, generator
        self.transform = train_transform(setting.image_size, "light", False, setting.min_crop_scale)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            index = order[start : start + self.batch_size]
            images = torch.stack([self.transform(image) for image in self.images[index]])  # (B, 3, S, S) uint8
            yield images.as_subclass(torch.Tensor), self.labels[index]


# ---------------------------------------------------------------------------------------------- models and training
def two_conv_net(num_classes: int, image_size: int) -> nn.Module:
    """The smallest convnet worth the name: two 3x3 conv + pool stages and a linear head (normalises like petvit's
    models: uint8 0..255 or float 0..1 in)."""

    class TwoConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip
            self.head = nn.Linear(64 * (image_size // 4) ** 2, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            return self.head(self.features(x - 0.5).flatten(1))  # (B, 64, S/4, S/4) -> (B, 64 * S/4 * S/4)

    return TwoConv()


def build_teacher(setting: Setting) -> nn.Module:
    if setting.arch == "twoconv":
        return two_conv_net(10, setting.image_size)
    return build_convnet(setting.arch, 10, "random", setting.image_size)


def build_student(setting: Setting, distilled: bool) -> ViT:
    config = get_config(
        "ti16",
        image_size=setting.image_size,
        patch_size=setting.patch_size,
        hidden_dim=setting.width,
        depth=setting.depth,
        num_heads=setting.heads,
        mlp_dim=2 * setting.width,
        num_classes=10,
        distilled=distilled,
    )
    return ViT(config)


def fit(
    model: nn.Module,
    data: Digits,
    setting: Setting,
    seed: int,
    distillation: DistillationLoss | None = None,
    teacher: bool = False,
) -> float:
    """Train with petvit's step (the distilled student through TwoHeads + DistillationLoss); test top-1 after the
    last epoch. `teacher`: the teacher's own epochs and LR, and no MixUp."""
    torch.manual_seed(seed)  # the crops and MixUp draws; the model was built under its own seed
    epochs, lr = (setting.teacher_epochs, setting.teacher_lr) if teacher else (setting.epochs, setting.lr)
    steps_per_epoch = len(data.train_y) // setting.batch_size
    schedule = LRSchedule(lr, 1e-6, steps_per_epoch * epochs, round(setting.warmup_epochs * steps_per_epoch))
    mixer = batch_mixer(10) if setting.mixup and not teacher else None
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=lr)
    opt = Optimization(optimizer, schedule, setting.label_smoothing, 1.0, mixer, distillation)
    step_module = TwoHeads(model) if distillation is not None else model
    generator, env, step = torch.Generator().manual_seed(seed), Runtime(torch.device("cpu")), 0
    for _ in range(epochs):
        batches = AugmentedBatches(data.train_x, data.train_y, setting, generator)
        step, _ = train_one_epoch(step_module, batches, opt, step, env, desc=None)
    return top1(model, data)


@torch.no_grad()
def top1(model: nn.Module, data: Digits) -> float:
    model.eval()
    return (model(data.test_x).argmax(dim=1) == data.test_y).float().mean().item()


def train_teacher(data: Digits, setting: Setting) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    teacher = build_teacher(setting)
    accuracy = fit(teacher, data, setting, seed=0, teacher=True)
    return teacher.requires_grad_(False).eval(), accuracy


def train_students(
    data: Digits, setting: Setting, teacher: nn.Module, seed: int, modes: tuple[str, ...] = MODES
) -> dict[str, float]:
    """Test top-1 of the student alone and distilled in each mode: same seed for the init and the data order."""
    torch.manual_seed(seed)
    scores = {"alone": fit(build_student(setting, distilled=False), data, setting, seed)}
    for mode in modes:
        torch.manual_seed(seed)
        loss = DistillationLoss(teacher, mode, setting.alpha, setting.tau)
        scores[mode] = fit(build_student(setting, distilled=True), data, setting, seed, loss)
    return scores


# ---------------------------------------------------------------------------------------------- the report
def summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        values = [r[name] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        wins = sum(r[name] > r["alone"] for r in rows) if name != "alone" else None
        out[name] = {"mean": statistics.mean(values), "stdev": sd, "beats_alone": wins}
    return out


def table(rows: list[dict[str, Any]], names: list[str], setting: Setting, teacher_top1: float) -> str:
    stats = summary(rows, names)
    lines = ["| student | test top-1, mean ± sd | per seed | beats alone |", "| --- | --- | --- | --- |"]
    for name in names:
        label = "tiny ViT alone" if name == "alone" else f"tiny ViT distilled ({name})"
        per_seed = " ".join(f"{r[name]:.3f}" for r in rows)
        wins = "" if name == "alone" else f"{stats[name]['beats_alone']}/{len(rows)} seeds"
        lines.append(f"| {label} | {stats[name]['mean']:.3f} ± {stats[name]['stdev']:.3f} | {per_seed} | {wins} |")
    lines.append(f"| {setting.arch} teacher (random init, {setting.teacher_epochs} epochs) | {teacher_top1:.3f} | | |")
    return "\n".join(lines)


def plot(
    rows: list[dict[str, Any]],
    names: list[str],
    teacher_top1: float,
    path: Path,
    note: str,
    title: str = "tiny ViT on real 8x8 digits: trained alone vs distilled from a convnet",
    ylabel: str = "test top-1 (held-out digits)",
) -> None:
    """Each student's per-seed test top-1 as dots, their mean as a bar, the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, name in enumerate(names):
        values = [r[name] for r in rows]
        ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.6)
        ax.hlines(statistics.mean(values), i - 0.25, i + 0.25, color="tab:blue")
    ax.axhline(teacher_top1, color="tab:orange", linestyle="--", label=f"convnet teacher {teacher_top1:.3f}")
    ax.set_xticks(range(len(names)), ["alone" if n == "alone" else f"distilled ({n})" for n in names])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.01, note, fontsize=6, color="dimgray", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Setting]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    for field, value in asdict(Setting()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, help="the digits tree (default: made in a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("results/distill_digits.png"))
    parser.add_argument("--json", type=Path, help="where the JSON goes (default: beside --out)")
    args = parser.parse_args(argv)
    return args, replace(Setting(), **{k: getattr(args, k) for k in asdict(Setting())})


def main(argv: list[str] | None = None) -> None:
    args, setting = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or make_digits_tree(Path(tmp) / "digits")
        data = load_digits_split(root, setting)
    tick = time.perf_counter()
    teacher, teacher_top1 = train_teacher(data, setting)
    print(f"{setting.arch} teacher: test top-1 {teacher_top1:.4f} ({time.perf_counter() - tick:.0f} s); "
          f"{len(data.train_y)} training images, {len(data.test_y)} test images", flush=True)  # fmt: skip
    rows = []
    for seed in args.seeds:
        tick = time.perf_counter()
        rows.append({"seed": seed, **train_students(data, setting, teacher, seed, tuple(args.modes))})
        scores = "  ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k != "seed")
        print(f"seed {seed}: {scores}  ({time.perf_counter() - tick:.0f} s)", flush=True)
    names = ["alone", *args.modes]
    print("\n" + table(rows, names, setting, teacher_top1))
    note = " ".join(f"{k}={v}" for k, v in asdict(setting).items()) + f" seeds={args.seeds}"
    plot(rows, names, teacher_top1, args.out, note)
    runs = [evidence_run(row, teacher_top1) for row in rows]
    doc = {"machine": machine(), "settings": asdict(setting), "seeds": args.seeds, "teacher_top1": teacher_top1,
           "claims": CLAIMS, "runs": runs, "summary": summary(rows, names)}  # fmt: skip
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out} and {json_path}")


CLAIMS = {
    "soft_beats_alone": "soft distillation beats the ViT alone (test top-1)",
    "soft_beats_alone_by_5": "soft distillation beats the ViT alone by >= 5 points",
    "hard_beats_alone": "hard distillation beats the ViT alone",
    "soft_beats_hard": "soft distillation beats hard distillation",
}


def evidence_run(row: dict[str, Any], teacher_top1: float) -> dict[str, Any]:
    """One seed's scores as bench/kernels.py merges them: measures and the claims they back."""
    measures = {"teacher": teacher_top1, **{k: v for k, v in row.items() if k != "seed"}}
    claims = {}
    if "soft" in row:
        measures["soft_minus_alone"] = row["soft"] - row["alone"]
        claims |= {
            "soft_beats_alone": row["soft"] > row["alone"],
            "soft_beats_alone_by_5": row["soft"] >= row["alone"] + 0.05,
        }
    if "hard" in row:
        measures["hard_minus_alone"] = row["hard"] - row["alone"]
        claims["hard_beats_alone"] = row["hard"] > row["alone"]
    if "soft" in row and "hard" in row:
        claims["soft_beats_hard"] = row["soft"] > row["hard"]
    return {"seed": row["seed"], "measures": measures, "claims": claims}


if __name__ == "__main__":
    main()
