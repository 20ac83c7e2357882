"""petvit's own recipes on real photos at a realistic size: Fashion-MNIST (70,000 28x28 grey photos of clothing, 10
classes) from Debian's `dataset-fashion-mnist`.

Everything trains through `petvit train` itself (cli.main, an ImageFolder tree, petvit's split, transforms, loop,
calibration and open-set fit): a convnet teacher (`--recipe teacher --arch resnet18 --init random`), then per seed a
small ViT alone (`--recipe scratch`) and the same ViT distilled from that teacher (`--recipe distill --distill hard`
and `soft`). Reported per seed and as mean [min, max]:
- test top-1 of every model on petvit's held-out test split (1/7 of each class: 10,000 images at full size);
- calibration of the ViT alone: test ECE before and after its stored temperature, each with a 95 % bootstrap interval
  over the test images;
- the open set: the same ViT trained on the first five classes (t-shirt/top ... coat) only, and the other five
  (sandal, shirt, sneaker, bag, ankle boot; Fashion-MNIST's own test file) as foreign: AUROC of the three scores;
- bfloat16 and int8 against float32 on the ViT alone's test images (bench/dtype_agreement.py's comparison).

    apt-get install dataset-fashion-mnist                    # once (Debian/Ubuntu), files in /usr/share/datasets/
    .venv/bin/python bench/fashion_mnist.py --quick          # end to end at a small size (figures meaningless)
    .venv/bin/python bench/fashion_mnist.py --jobs 3 --threads 2                     # the full size, 3 seeds
    .venv/bin/python bench/kernels.py fashion_mnist --kernels native -- --seeds 0 1 2 --jobs 3 --threads 2

(--threads: the teacher's, trained first; each seed's process then runs on one thread.)

The last is what docs/models.md quotes (merged into docs/evidence/fashion_mnist.json); its cost and figures are
there. Writes results/fashion_mnist.{json,png} (git-ignored; --json to put it elsewhere) with the machine it ran on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.distill_digits import plot
from bench.dtype_agreement import compare
from bench.evidence import machine, spread
from cli.main import main as petvit
from model.artifact import ArtifactMetadata, load_artifact
from model.config import resize_size_for
from model.convert.teachers import load_convnet_artifact
from model.vit import ViT
from training.calibration import expected_calibration_error
from training.data import DataConfig, eval_transform, load_splits
from training.open_set import Outputs, collect_outputs, compare_scores

FASHION = Path("/usr/share/datasets/fashion-mnist")
INSTALL = (
    f"Fashion-MNIST is not installed (no {FASHION}/train-images-idx3-ubyte.gz): on Debian or Ubuntu, "
    "`apt-get install dataset-fashion-mnist` puts the four idx files there; elsewhere, copy Zalando's "
    "train/t10k idx .gz files into that folder or pass --fashion-dir"
)
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
KNOWN = 5  # the open set: classes 0-4 known, 5-9 foreign
TEST_FRACTION = 1 / 7  # 10,000 of 70,000: the size of Fashion-MNIST's own test set
# Each 28x28 photo is written on a 32x32 black canvas (Fashion-MNIST's own background colour): petvit's evaluation
# view resizes the shorter side to 256/224 of the crop and centre-crops, which for 28 px photos would upscale them
# to 32 and cut 2 px off every garment's edges (a trouser's hems, a dress's shoulders); with the canvas, that view
# is the photo itself, pixel for pixel. Worth ~0.8 points of test top-1 to the ViT at 4 epochs (one seed).
PAD = (resize_size_for(28) - 28) // 2
CLAIMS = {
    "vit_alone_88": "the small ViT alone reaches >= 88 % test top-1",
    "soft_beats_alone": "soft distillation beats the ViT alone",
    "hard_beats_alone": "hard distillation beats the ViT alone",
    "ece_lowered": "the temperature lowers the test ECE",
    "mahalanobis_best": "Mahalanobis has the best AUROC (5 classes known, 5 foreign)",
    "int8_agrees_98": "int8 agrees with float32 on >= 98 % of the 10,000 test images (the ViT alone)",
    "bf16_cast_agrees_99": "bfloat16 (weights cast, as served) agrees with float32 on >= 99 % of them",
}
AGREEMENT = ("int8_agreement", "bf16_cast_agreement", "bf16_autocast_agreement", "int8_rollout_max_abs")


@dataclass(frozen=True)
class Size:
    """How much data and training: --quick for an end-to-end check, the defaults for the figures."""

    per_class: int = 7000  # images per class in the tree (all 7,000 = 70,000)
    # Sized for a 2-core CPU: each seed trains four ViTs (alone, hard, soft, open set) from scratch, and a ViT
    # from scratch learns slowly (docs/models.md has what these sizes cost and reach).
    epochs: int = 10
    teacher_epochs: int = 3
    width: int = 64
    depth: int = 4
    batch_size: int = 128
    lr: float = 3e-3  # the scratch recipe's 1e-3 is for 100 epochs; 3e-3 learned faster in a short run (one seed)
    warmup_epochs: float = 0.5  # the scratch recipe's 5 warm-up epochs would outlast the whole run
    augment: str = "none"  # light's random crops slow a 4-epoch run down more than they regularise it


QUICK = Size(per_class=200, epochs=2, teacher_epochs=1, width=64, depth=2, batch_size=64)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (Fashion-MNIST's format): images (N, 28, 28) or labels (N,) uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]  # magic: 0, 0, dtype 0x08 (uint8), number of dimensions
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(INSTALL)
    return {
        split: (read_idx(folder / f"{split}-images-idx3-ubyte.gz"), read_idx(folder / f"{split}-labels-idx1-ubyte.gz"))
        for split in ("train", "t10k")
    }


def write_tree(root: Path, data: dict, classes: range, per_class: int) -> Path:
    """<root>/<class>/<n>.png for the first `per_class` images of each class (train file first, then t10k), each on
    its black canvas, once."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    images = np.concatenate([data["train"][0], data["t10k"][0]])
    labels = np.concatenate([data["train"][1], data["t10k"][1]])
    for c in classes:
        folder = root / f"{c}_{CLASSES[c]}"
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(np.pad(images[i], PAD), "L").save(folder / f"{n}.png")  # (32, 32)
    done.touch()
    return root


def train(recipe: str, tree: Path, out: Path, size: Size, seed: int, extra: list[str]) -> Path:
    """One `petvit train` run, as a user would type it (float32, no workers, this process's torch threads; the
    70,000 small PNGs decoded once, which halves an epoch here)."""
    epochs = size.teacher_epochs if recipe == "teacher" else size.epochs
    argv = ["train", "--recipe", recipe, "--dataset", "folder", "--data-dir", str(tree), "--out", str(out),
            "--output-dir", str(out.with_suffix("")), "--epochs", str(epochs), "--batch-size", str(size.batch_size),
            "--seed", str(seed), "--test-fraction", repr(TEST_FRACTION), "--augment", size.augment,
            "--warmup-epochs", str(size.warmup_epochs), "--min-crop-scale", "0.6", "--no-mixup", "--workers", "0",
            "--threads", str(torch.get_num_threads()), "--no-download",
            "--dtype", "fp32", "--cache-images", "--if-missing", *extra]  # fmt: skip
    if recipe != "teacher":  # the teacher keeps its recipe's learning rate
        argv += ["--lr", str(size.lr)]
    if petvit(argv) != 0:
        raise SystemExit(f"petvit {' '.join(argv)} failed")
    return out


def vit_settings(size: Size) -> list[str]:
    shape = {"image_size": 28, "patch_size": 4, "hidden_dim": size.width, "depth": size.depth, "num_heads": 4,
             "mlp_dim": 2 * size.width}  # fmt: skip  # 28 px in 4 px patches: a 7 x 7 grid
    return [arg for key, value in shape.items() for arg in ("--set", f"{key}={value}")]


def test_split(tree: Path, meta: ArtifactMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """petvit's test split of `tree` (the split `petvit train` scored) through the model's eval transform, decoded
    once: images (N, 3, 28, 28) uint8 and labels (N,)."""
    config = DataConfig(
        dataset="folder", data_dir=str(tree), image_size=28, test_fraction=float(f"{TEST_FRACTION:.6f}")
    )
    pairs = list(load_splits(config).test.with_transform(eval_transform(28, policy=meta.preprocessing)))
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def outputs_of(model: ViT, images: torch.Tensor, labels: torch.Tensor, desc: str) -> Outputs:
    """Logits and CLS features through the one CLS-feature path (model/inference.batch_outputs)."""
    with torch.no_grad():
        return collect_outputs(model, TensorDataset(images, labels), batch_size=256, desc=desc)


def bootstrap_ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float, draws: int = 1000) -> dict:
    """ECE before and after the temperature, each with the 2.5-97.5 % percentiles over resampled test sets."""
    generator = torch.Generator().manual_seed(0)
    before, after = logits.softmax(-1), (logits / temperature).softmax(-1)
    out = {"before": expected_calibration_error(before, targets), "after": expected_calibration_error(after, targets)}
    samples = {"before": [], "after": []}
    for _ in range(draws):
        rows = torch.randint(0, len(targets), (len(targets),), generator=generator)
        samples["before"].append(expected_calibration_error(before[rows], targets[rows]))
        samples["after"].append(expected_calibration_error(after[rows], targets[rows]))
    for key, values in samples.items():
        out[f"{key}_interval"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


def foreign_outputs(model: ViT, meta: ArtifactMetadata, data: dict) -> Outputs:
    """The five unknown classes' images of Fashion-MNIST's own test file, through the model's eval transform."""
    images, labels = data["t10k"]
    canvas = np.pad(images[labels >= KNOWN], ((0, 0), (PAD, PAD), (PAD, PAD)))  # (N, 32, 32), as the tree's
    foreign = torch.from_numpy(canvas)[:, None].expand(-1, 3, -1, -1)  # (N, 3, 32, 32)
    transform = eval_transform(28, policy=meta.preprocessing)
    batch = torch.stack([transform(image) for image in foreign])  # (N, 3, 28, 28) uint8
    return outputs_of(model, batch, torch.full((len(batch),), -1), "foreign")


def run_seed(seed: int, work: Path, trees: dict[str, Path], teacher: Path, data: dict, size: Size) -> dict:
    tick, vit = time.perf_counter(), vit_settings(size)
    tag = f"seed{seed}"
    alone = train("scratch", trees["all"], work / f"alone-{tag}.safetensors", size, seed, vit)
    scores = {"alone": alone}
    for mode in ("hard", "soft"):
        extra = [*vit, "--teacher", str(teacher), "--distill", mode]
        scores[mode] = train("distill", trees["all"], work / f"{mode}-{tag}.safetensors", size, seed, extra)
    top1 = {name: load_artifact(path)[1].evaluation["top1"] for name, path in scores.items()}
    model, meta = load_artifact(alone)
    images, labels = test_split(trees["all"], meta)  # decoded once: the outputs and the dtype comparison share them
    test = outputs_of(model, images, labels, "test outputs")
    calibration = bootstrap_ece(test.logits, test.targets, meta.calibration.temperature)
    with torch.inference_mode():  # bench/dtype_agreement.py's comparison, on the 10,000 test images
        agreement = {key: value for key, value in compare(model, images, labels).items() if key in AGREEMENT}
    known_model, known_meta = load_artifact(train("scratch", trees["known"], work / f"known-{tag}.safetensors", size,
                                                  seed, vit))  # fmt: skip
    known_test = outputs_of(known_model, *test_split(trees["known"], known_meta), "test outputs")
    table = compare_scores(known_meta.open_set, known_meta.calibration, known_test,
                           foreign_outputs(known_model, known_meta, data))  # fmt: skip
    aurocs = {name: row["auroc"] for name, row in table.items()}
    measures = {**top1, "temperature": meta.calibration.temperature, "ece_before": calibration["before"],
                "ece_after": calibration["after"], **{f"auroc_{k}": v for k, v in aurocs.items()},
                **agreement}  # fmt: skip
    claims = {
        "vit_alone_88": top1["alone"] >= 0.88,
        "soft_beats_alone": top1["soft"] > top1["alone"],
        "hard_beats_alone": top1["hard"] > top1["alone"],
        "ece_lowered": calibration["after"] < calibration["before"],
        "mahalanobis_best": aurocs["mahalanobis"] > max(aurocs["msp"], aurocs["energy"]),
        "int8_agrees_98": agreement["int8_agreement"] >= 0.98,
        "bf16_cast_agrees_99": agreement["bf16_cast_agreement"] >= 0.99,
    }
    print(f"seed {seed}: {measures} ({time.perf_counter() - tick:.0f} s)", flush=True)
    return {"seed": seed, "measures": measures, "claims": claims, "ece_bootstrap": calibration}


def seed_job(seed: int, work: Path, trees: dict[str, Path], teacher: Path, data: dict, size: Size) -> dict:
    """run_seed in a worker process of --jobs, on one torch thread."""
    torch.set_num_threads(1)
    return run_seed(seed, work, trees, teacher, data, size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a small end-to-end run: {QUICK}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fashion-dir", type=Path, default=FASHION)
    parser.add_argument("--work", type=Path, default=Path("results/fashion_mnist"), help="trees and artifacts")
    parser.add_argument("--json", type=Path, default=Path("results/fashion_mnist.json"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds trained side by side, one torch thread each (e.g. 3 on 2 cores)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else Size()
    data = load_fashion(args.fashion_dir)
    work = args.work / f"{size.per_class}-per-class-{size.epochs}-epochs-{size.width}x{size.depth}"
    trees = {"all": write_tree(work / "tree", data, range(10), size.per_class),
             "known": write_tree(work / "tree-known", data, range(KNOWN), size.per_class)}  # fmt: skip
    teacher_args = ["--arch", "resnet18", "--init", "random", "--set", "image_size=28"]
    teacher = train("teacher", trees["all"], work / "teacher.safetensors", size, 0, teacher_args)
    teacher_top1 = load_convnet_artifact(teacher)[1]["evaluation"]["top1"]
    print(f"resnet18 teacher: test top-1 {teacher_top1:.4f}", flush=True)
    if args.jobs > 1:  # each seed in its own process, one thread each: petvit train's data loading leaves a core idle
        # spawn, not fork: this process has run torch's thread pools, which a forked child must not inherit
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(seed_job, seed, work, trees, teacher, data, size) for seed in args.seeds]
            runs = [job.result() for job in jobs]
    else:
        runs = [run_seed(seed, work, trees, teacher, data, size) for seed in args.seeds]
    for run in runs:
        run["measures"]["teacher"] = teacher_top1
    summary = {k: spread([r["measures"][k] for r in runs]) for k in runs[0]["measures"]}
    for key, s in summary.items():
        print(f"{key:<18} {s['mean']:.4f} [{s['min']:.4f}, {s['max']:.4f}]")
    note = f"{asdict(size)} seeds={args.seeds} quick={args.quick}"
    title = "Fashion-MNIST through petvit train: small ViT alone vs distilled from a resnet18"
    rows = [r["measures"] for r in runs]
    plot(rows, ["alone", "hard", "soft"], teacher_top1, args.json.with_suffix(".png"), note, title, "test top-1")
    doc = {"machine": machine(), "settings": {**asdict(size), "quick": args.quick}, "seeds": args.seeds,
           "claims": CLAIMS, "runs": runs, "summary": summary}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
