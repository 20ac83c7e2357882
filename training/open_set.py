"""Open-set recognition, fitted and measured: "is this image any of the classes at all?"

After training (training/loop.py, finish) `fit_trust` fits, from the model's outputs on the training and validation
splits:
- the temperature (training/calibration.py), on the validation split;
- the Mahalanobis statistics: one mean per class and one covariance shared by the classes, of the CLS feature on the
  training split (Lee et al. 2018); stored inverted (the precision matrix), with a small ridge so that a model with
  fewer training images than feature dimensions still has one;
- a threshold per score (model/trust.py: msp, energy, mahalanobis) on the validation split, so that a target share
  of in-distribution images (default 95 %) is accepted. The validation split, not the training one: training images
  sit closer to their class means than any new image does, and a threshold set on them would reject too many.

`petvit evaluate --ood-dir` (training/evaluate.py) measures each score against a folder of images that are not
pets: AUROC, FPR at 95 % TPR (the share of foreign images still accepted when 95 % of in-distribution images are),
and the acceptance at the stored threshold, with a histogram PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.inference import batch_outputs
from model.trust import CLASS_MEANS, DEFAULT_ACCEPTANCE, DEFAULT_SCORE, PRECISION, SCORES, Calibration, OpenSet
from model.vit import ViT
from training.calibration import fit_calibration
from training.plots import plot_score_histograms

HISTOGRAM_FILE = "open_set_scores.png"
RIDGE = 1e-3  # added to the shared covariance, relative to its mean variance
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Outputs:
    """A model's answers over a split: uncalibrated logits (N, C), CLS features (N, D), targets (N,), float32 CPU."""

    logits: torch.Tensor
    features: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def collect_outputs(
    model: ViT,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: torch.dtype | None = None,
    desc: str = "outputs",
) -> Outputs:
    """Logits and CLS features of every image, from one pass (model.inference.batch_outputs, so these logits are
    the ones training.evaluate's `predict` gives)."""
    model.eval()
    device = torch.device(device)
    logits, features, targets = [], [], []
    for images, labels in tqdm(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers), desc=desc,
                               unit="batch", leave=False):  # fmt: skip
        outputs = batch_outputs(model, images.to(device), amp)
        logits.append(outputs.logits.cpu())
        features.append(outputs.features.cpu())  # the CLS token (model/trust.py)
        targets.append(torch.as_tensor(labels, dtype=torch.long))
    if not logits:
        c, d = model.config.num_classes, model.config.hidden_dim
        return Outputs(torch.zeros(0, c), torch.zeros(0, d), torch.zeros(0, dtype=torch.long))
    return Outputs(torch.cat(logits), torch.cat(features), torch.cat(targets))


def fit_class_gaussians(
    features: torch.Tensor, targets: torch.Tensor, num_classes: int, ridge: float = RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class means (C, D), precision (D, D)): the inverse of the covariance shared by the classes (each feature
    minus its own class mean), plus ridge x its mean variance on the diagonal. A class without images gets the
    overall mean (it then never is the nearest by accident of a zero vector)."""
    x = features.double()
    overall = x.mean(dim=0)
    means = torch.stack([x[targets == c].mean(dim=0) if (targets == c).any() else overall for c in range(num_classes)])
    centred = x - means[targets]  # (N, D)
    covariance = centred.T @ centred / max(len(x) - 1, 1)  # (D, N) @ (N, D) -> (D, D)
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    covariance = covariance + ridge * scale * torch.eye(x.shape[1], dtype=x.dtype)
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2  # symmetric to the last bit, as the Cholesky factor wants
    return means.float(), precision.float()


def threshold_for(scores: torch.Tensor, acceptance: float = DEFAULT_ACCEPTANCE) -> float:
    """The smallest score threshold that accepts (score <= threshold) at least `acceptance` of these scores."""
    if len(scores) == 0:
        raise ValueError("cannot choose a threshold from no images")
    ordered = scores.double().sort().values
    k = min(max(math.ceil(acceptance * len(ordered)), 1), len(ordered))
    return float(ordered[k - 1])


def accepted_share(scores: torch.Tensor, threshold: float) -> float:
    """The share of images whose score is at or below the threshold (not unknown)."""
    return float((scores <= threshold).double().mean()) if len(scores) else float("nan")


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Probability that an out-of-distribution image scores higher than an in-distribution one (ties count half):
    the Mann-Whitney statistic, from average ranks."""
    both = torch.cat([in_scores, out_scores]).double()
    _, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based average rank of each score
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """The share of out-of-distribution images accepted by the threshold that accepts `tpr` of in-distribution."""
    return accepted_share(out_scores, threshold_for(in_scores, tpr))


def fit_trust(
    train: Outputs,
    val: Outputs,
    num_classes: int,
    score: str = DEFAULT_SCORE,
    acceptance: float = DEFAULT_ACCEPTANCE,
) -> dict[str, Any]:
    """{"calibration": Calibration, "open_set": OpenSet}: the temperature and thresholds on `val`, the class
    Gaussians on `train` (ArtifactMetadata fields)."""
    calibration = fit_calibration(val.logits, val.targets)
    means, precision = fit_class_gaussians(train.features, train.targets, num_classes)
    fitted = OpenSet(score=score, target_acceptance=acceptance, tensors={CLASS_MEANS: means, PRECISION: precision})
    val_scores = fitted.scores(val.logits / calibration.temperature, val.features)
    open_set = OpenSet(
        score=score,
        thresholds={name: threshold_for(s, acceptance) for name, s in val_scores.items()},
        target_acceptance=acceptance,
        fitted={
            "class_gaussians": "train",
            "thresholds": "val",
            "num_train": len(train.targets),
            "num_val": len(val.targets),
            "ridge": RIDGE,
        },
        tensors=fitted.tensors,
    )
    return {"calibration": calibration, "open_set": open_set}


def compare_scores(
    open_set: OpenSet | None,
    calibration: Calibration | None,
    inside: Outputs,
    outside: Outputs,
) -> dict[str, dict[str, Any]]:
    """Per score: AUROC, FPR at 95 % TPR, and (where the artifact has a threshold for it) the in-distribution
    acceptance and the share of foreign images marked unknown at that threshold. Artifacts without an open set are
    measured on the logit scores alone (the Mahalanobis score needs the class means only training fits)."""
    measure = open_set or OpenSet()
    t = calibration.temperature if calibration else 1.0
    ins = measure.scores(inside.logits / t, inside.features)
    outs = measure.scores(outside.logits / t, outside.features)
    table: dict[str, dict[str, Any]] = {}
    for name in (s for s in SCORES if s in ins):
        threshold = measure.thresholds.get(name)
        table[name] = {
            "auroc": auroc(ins[name], outs[name]),
            "fpr_at_95_tpr": fpr_at_tpr(ins[name], outs[name], 0.95),
            "threshold": threshold,
            "in_accepted": accepted_share(ins[name], threshold) if threshold is not None else None,
            "out_unknown": 1 - accepted_share(outs[name], threshold) if threshold is not None else None,
            "chosen": open_set is not None and name == open_set.score,
            "in_scores": ins[name].numpy(),
            "out_scores": outs[name].numpy(),
        }
    return table


def open_set_report(
    table: dict[str, dict[str, Any]], output_dir: str | Path, num_in: int, num_out: int, title: str = ""
) -> dict[str, Any]:
    """The JSON-ready report of compare_scores' table, and its histogram PNG in output_dir."""
    scores = {name: {"in": row["in_scores"], "out": row["out_scores"]} for name, row in table.items()}
    notes = {name: f"AUROC {row['auroc']:.3f}" for name, row in table.items()}
    path = plot_score_histograms(
        scores, {n: r["threshold"] for n, r in table.items()}, Path(output_dir) / HISTOGRAM_FILE, notes, title
    )
    rows = {name: {k: v for k, v in row.items() if not k.endswith("_scores")} for name, row in table.items()}
    return {"num_in": num_in, "num_out": num_out, "scores": rows, "file": str(path)}


def format_open_set_table(report: dict[str, Any]) -> str:
    """The printed table of open_set_report."""

    def cell(value: float | None) -> str:
        return "    -" if value is None else f"{value:.3f}"

    lines = [f"{'score':<12} {'AUROC':>6} {'FPR@95':>7} {'threshold':>10} {'in ok':>6} {'out unk':>8}"]
    for name, row in report["scores"].items():
        threshold = "-" if row["threshold"] is None else f"{row['threshold']:.4g}"
        lines.append(
            f"{name + (' *' if row['chosen'] else ''):<12} {row['auroc']:>6.3f} {row['fpr_at_95_tpr']:>7.3f} "
            f"{threshold:>10} {cell(row['in_accepted']):>6} {cell(row['out_unknown']):>8}"
        )
    return "\n".join(lines)


class ImageFiles(Dataset):
    """Every image file under a folder (recursively, sorted), as (transformed image, -1): the --ood-dir images."""

    def __init__(self, root: str | Path, transform: nn.Module) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"--ood-dir {self.root} is not a folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"--ood-dir {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), -1


__all__ = [
    "HISTOGRAM_FILE",
    "ImageFiles",
    "Outputs",
    "accepted_share",
    "auroc",
    "collect_outputs",
    "compare_scores",
    "fit_class_gaussians",
    "fit_trust",
    "format_open_set_table",
    "fpr_at_tpr",
    "open_set_report",
    "threshold_for",
]
