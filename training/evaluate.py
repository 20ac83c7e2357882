"""`petvit evaluate`: top-1/top-5, per-class and cat-vs-dog accuracy, confusion matrix and curves PNGs, a JSON
report, and (with --write-metadata) the summary stored in the artifact the service shows at /v1/model. With
heatmaps=True (Pets only) it also scores the heatmap methods against the pets' masks (training/heatmaps.py).

Evaluation always uses the deterministic eval transform and, for folder trees, the same seeded split the
model was trained with (read from the artifact), so the test images are ones training never saw.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.artifact import ArtifactMetadata, file_sha256, load_artifact, save_artifact
from model.convert.teachers import ConvNet
from model.inference import batch_outputs as vit_outputs
from model.inference import prepare_for_inference
from model.precision import autocast_dtype, dtype_name, is_quantised
from model.vit import ViT
from training.calibration import calibration_report
from training.data import DataConfig, eval_transform, load_splits
from training.heatmaps import evaluate_heatmaps
from training.open_set import ImageFiles, collect_outputs, compare_scores, open_set_report
from training.plots import plot_confusion_matrix, plot_training_curves

REPORT_FILE = "report.json"
CONFUSION_FILE = "confusion_matrix.png"
CURVES_FILE = "training_curves.png"


def batch_outputs(
    model: ViT | nn.Module, images: torch.Tensor, amp: torch.dtype | None, pre_logits: bool
) -> torch.Tensor:
    """One batch's logits (B, C), or a ViT's pre-logits features (B, D), in float32.

    A ViT goes through model.inference.batch_outputs (its rule for where autocast stops), so a linear probe's head
    over cached features computes exactly these numbers. Other networks (a convnet teacher) answer directly.
    """
    if not isinstance(model, ViT):
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            return model(images).float()
    outputs = vit_outputs(model, images, amp)
    return outputs.pre_logits if pre_logits else outputs.logits


def _scored_model(model: ViT, dtype: str, device: torch.device) -> tuple[ViT, torch.dtype | None, str]:
    """(the model to score, its autocast dtype, the dtype's name). Floating dtypes autocast, as training scores its
    test split: the weights stay float32 (so --write-metadata saves them as they are) and the report equals the one
    `petvit train` stored; the service casts its weights instead, and the digits agreement tests hold both to
    float32's top-1. int8 scores a copy quantised exactly as the service quantises it (model.inference)."""
    if is_quantised(dtype):
        return prepare_for_inference(copy.deepcopy(model), dtype, device).model, None, "int8"
    amp = autocast_dtype(dtype, device)
    return model, amp, dtype_name(amp or torch.float32)


@torch.no_grad()
def predict(
    model: ViT | nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "evaluate",
    pre_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) float32, targets (N,)) for the whole dataset, in order, with a tqdm bar.

    pre_logits=True returns the CLS features (N, D) instead: the linear probe's inputs. A distilled ViT's logits are
    its two heads' mean (ViT.forward_head), a convnet's its own.
    """
    model.eval()
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, targets = [], []
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False):
        logits.append(batch_outputs(model, images.to(device), autocast_dtype, pre_logits).cpu())
        targets.append(torch.as_tensor(labels, dtype=torch.long))
    if not logits:
        if isinstance(model, ViT):
            width = model.config.feature_dim if pre_logits else model.config.num_classes
        elif isinstance(model, ConvNet):  # a convnet teacher
            width = model.num_classes
        else:
            raise TypeError(f"no output width known for an empty pass of a {type(model).__name__}")
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def compute_metrics(
    logits: torch.Tensor, targets: torch.Tensor, labels: Sequence[str], species: Sequence[str]
) -> dict[str, Any]:
    """Every number the report and the artifact carry, from logits (N, C) and integer targets (N,)."""
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices  # (N, k), best first
    pred = topk[:, 0]
    correct = pred == targets
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((targets, pred), torch.ones_like(targets), accumulate=True)
    support = confusion.sum(dim=1)
    per_class = {
        label: (confusion[i, i].item() / support[i].item() if support[i] > 0 else None)
        for i, label in enumerate(labels)
    }
    # Cat vs dog: is the predicted breed of the right species? Only defined when every class has a species.
    cat_vs_dog = None
    if all(s in ("cat", "dog") for s in species):
        is_dog = torch.tensor([s == "dog" for s in species])
        cat_vs_dog = (is_dog[pred] == is_dog[targets]).float().mean().item()
    return {
        "num_images": n,
        "top1": correct.float().mean().item(),
        "top5": (topk == targets[:, None]).any(dim=1).float().mean().item(),
        "top5_k": k,  # fewer than 5 classes -> top-k over all of them
        "loss": F.cross_entropy(logits, targets).item(),
        "per_class": per_class,
        "per_class_support": {label: int(support[i]) for i, label in enumerate(labels)},
        "mean_per_class": _mean([v for v in per_class.values() if v is not None]),
        "cat_vs_dog": cat_vs_dog,
        "confusion_matrix": confusion.tolist(),
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def metadata_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a report stored in the artifact (the confusion matrix stays in the report file)."""
    keys = (
        "top1",
        "top5",
        "per_class",
        "mean_per_class",
        "cat_vs_dog",
        "num_images",
        "loss",
        "split",
        "dataset",
        "dtype",
    )
    summary = {k: report[k] for k in keys if k in report} | {"evaluated_at": report.get("evaluated_at")}
    if "heatmaps" in report:  # the numbers, not where this machine wrote its PNG
        summary["heatmaps"] = {k: v for k, v in report["heatmaps"].items() if k != "file"}
    if "calibration" in report:  # the ECEs, not the bins
        summary["calibration"] = {
            k: report["calibration"][k] for k in ("temperature", "bins", "ece_before", "ece_after")
        }
    if "open_set" in report:
        summary["open_set"] = {k: v for k, v in report["open_set"].items() if k != "file"}
    return summary


def write_report(
    report: dict[str, Any],
    labels: Sequence[str],
    output_dir: str | Path,
    history: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """report.json, confusion_matrix.png and (when there is a history) training_curves.png in output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": output_dir / REPORT_FILE, "confusion_matrix": output_dir / CONFUSION_FILE}
    title = (
        f"{report.get('name', 'petvit')} on {report.get('dataset')} {report.get('split')}: top-1 {report['top1']:.3f}"
    )
    plot_confusion_matrix(report["confusion_matrix"], labels, paths["confusion_matrix"], title=title)
    if history:
        paths["curves"] = plot_training_curves(history, output_dir / CURVES_FILE, title=report.get("name", ""))
    for key, name in (("heatmaps", "heatmap_examples"), ("calibration", "reliability"), ("open_set", "open_set")):
        if report.get(key, {}).get("file"):
            paths[name] = Path(report[key]["file"])
    report = {**report, "files": {k: str(v) for k, v in paths.items()}}
    paths["report"].write_text(json.dumps(report, indent=2))
    return paths


def data_config_from_metadata(meta: ArtifactMetadata, dataset: str | None, data_dir: str | None) -> DataConfig:
    """The split the model was trained with (fractions and seed from its training record), on the data given."""
    stored = dict(meta.training.get("data") or {})
    known = set(DataConfig.__dataclass_fields__)
    base = DataConfig(**{k: v for k, v in stored.items() if k in known})
    return dataclasses.replace(
        base,
        dataset=dataset or base.dataset,
        data_dir=data_dir or base.data_dir,
        image_size=meta.preprocessing.image_size,
        download=False,  # evaluation reads what is there; a missing dataset is reported, not fetched
    )


def evaluate_artifact(
    checkpoint: str | Path,
    *,  # thirteen settings: by name only, so a caller cannot shift one into its neighbour's place
    dataset: str | None = None,
    data_dir: str | None = None,
    output_dir: str | Path = "results/evaluate",
    split: str = "test",
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int = 0,
    write_metadata: bool = False,
    dtype: str = "auto",
    heatmaps: bool = False,
    heatmap_images: int = 0,
    ood_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate an artifact on a split in `dtype` (model.precision's names and its "auto" rule); writes the report
    files; optionally stores the summary in the artifact. heatmaps=True adds the heatmap scores on Pets' masks
    (on an evenly spaced sample of heatmap_images images when > 0). Calibration (ECE before and after the
    artifact's temperature, a reliability diagram) is always reported; ood_dir, a folder of images that are none of
    the classes, adds the open-set scores compared against the split's images (training/open_set.py)."""
    model, meta = load_artifact(checkpoint, device=device)
    scored, amp, dtype_label = _scored_model(model, dtype, torch.device(device))
    data = data_config_from_metadata(meta, dataset, data_dir)
    splits = load_splits(data)
    labels = list(meta.labels)
    if list(splits.labels) != labels:
        # Same count is not enough: class i of the data must be class i of the head, or every metric is wrong.
        raise ValueError(
            f"the artifact's {len(labels)} classes are not {data.data_dir}'s {len(splits.labels)} classes in the "
            f"same order (first difference: {_first_difference(labels, splits.labels)}); evaluate on the data "
            "the model was trained for"
        )
    view = getattr(splits, split).with_transform(eval_transform(model.config.image_size, policy=meta.preprocessing))
    desc = f"evaluate {split} ({dtype_label})"
    inside = collect_outputs(scored, view, batch_size, device, num_workers, amp, desc=desc)
    logits, targets = inside.logits, inside.targets
    report = {
        "name": meta.name,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "dataset": data.dataset,
        "data_dir": str(data.data_dir),
        "split": split,
        "dtype": dtype_label,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "labels": labels,
        **compute_metrics(logits, targets, labels, list(meta.species)),
        "calibration": calibration_report(logits, targets, meta.calibration, output_dir, f"{meta.name} on {split}"),
    }
    if ood_dir is not None:
        images = ImageFiles(ood_dir, eval_transform(model.config.image_size))
        outside = collect_outputs(scored, images, batch_size, device, num_workers, amp, desc=f"evaluate {ood_dir}")
        table = compare_scores(meta.open_set, meta.calibration, inside, outside)
        title = f"{meta.name}: {split} split vs {Path(ood_dir).name}"
        report["open_set"] = open_set_report(table, output_dir, len(targets), len(images), title) | {
            "ood_dir": str(ood_dir)
        }
    if heatmaps:
        report["heatmaps"] = evaluate_heatmaps(
            model, data, split, output_dir, batch_size, device, num_workers, amp, heatmap_images
        )
    if write_metadata:
        meta = meta.replace(evaluation=metadata_summary(report))
        save_artifact(model.cpu(), checkpoint, meta)
        # The report names the file as it now is (the one the service loads and shows the sha256 of).
        report["checkpoint_sha256"] = file_sha256(checkpoint)
    history = meta.training.get("history")
    report["files"] = {k: str(v) for k, v in write_report(report, labels, output_dir, history).items()}
    return report


def _first_difference(ours: Sequence[str], theirs: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return f"class {i} is {a!r} in the artifact, {b!r} in the data"
    return f"the artifact has {len(ours)} classes, the data {len(theirs)}"
