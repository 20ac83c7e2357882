"""`petvit evaluate`: score an artifact on a split and write the report, its PNGs and (optionally) the summary
into the artifact (training/evaluate.py does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.artifact import ArtifactError
from model.precision import QUANTISED_DTYPES, TRAINING_DTYPE_CHOICES
from training.data import DatasetUnavailable
from training.evaluate import evaluate_artifact
from training.heatmaps import format_table
from training.open_set import format_open_set_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="artifact to evaluate (.safetensors)")
    parser.add_argument("--dataset", choices=("pets", "folder"), help="default: the one it was trained on")
    parser.add_argument("--data-dir", help="default: the one it was trained on")
    parser.add_argument("--output-dir", type=Path, default=Path("results/evaluate"))
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--dtype",
        choices=(*TRAINING_DTYPE_CHOICES, *QUANTISED_DTYPES),
        default="auto",
        help="score in this dtype: float dtypes by autocast as training does (auto: bfloat16 on CUDA and on CPUs "
        "with native bf16, float32 elsewhere); int8 quantised as PETVIT_DTYPE=int8 serves it",
    )
    parser.add_argument(
        "--write-metadata", action="store_true", help="store the summary in the artifact (shown at /v1/model)"
    )
    parser.add_argument(
        "--heatmaps",
        action="store_true",
        help="also score every heatmap method against the pets' masks (Pets only: pointing game, heat on the pet, "
        "beside the pet's area fraction) and write heatmap_examples.png; one more forward and backward pass per image",
    )
    parser.add_argument(
        "--heatmap-images",
        type=int,
        default=0,
        metavar="N",
        help="with --heatmaps, score an evenly spaced sample of N images of the split (default 0: all of them)",
    )

    parser.add_argument(
        "--ood-dir",
        type=Path,
        metavar="DIR",
        help="a folder of images that are none of the model's classes (not pets): compare the open-set scores (max "
        "softmax, energy, Mahalanobis) on them against the split's images: AUROC, FPR at 95%% TPR, acceptance at "
        "the artifact's thresholds, and open_set_scores.png",
    )


def main(args: argparse.Namespace) -> int:
    try:
        report = evaluate_artifact(
            args.checkpoint,
            dataset=args.dataset,
            data_dir=args.data_dir,
            output_dir=args.output_dir,
            split=args.split,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=args.workers,
            write_metadata=args.write_metadata,
            dtype=args.dtype,
            heatmaps=args.heatmaps,
            heatmap_images=args.heatmap_images,
            ood_dir=args.ood_dir,
        )
    except (DatasetUnavailable, ArtifactError, ValueError) as err:  # ValueError: wrong classes, empty split
        print(f"petvit evaluate: {err}", file=sys.stderr)
        return 2
    cvd = report["cat_vs_dog"]
    print(
        f"{report['split']} ({report['num_images']} images, {report['dtype']}): "
        f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}"
        + (f"  cat-vs-dog {cvd:.4f}" if cvd is not None else "")
    )
    cal = report["calibration"]
    temperature = "no temperature in the artifact" if cal["temperature"] is None else f"T {cal['temperature']:.3f}"
    print(f"calibration ({temperature}): ECE ({cal['bins']} bins) {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    if "open_set" in report:
        ood = report["open_set"]
        print(
            f"open set: {ood['num_in']} {report['split']} images vs {ood['num_out']} from {ood['ood_dir']} (* decides):"
        )
        print(format_open_set_table(ood))
    if "heatmaps" in report:
        maps = report["heatmaps"]
        print(f"heatmaps on {maps['num_images']} images (pointing game, heat mass on the pet):")
        print(format_table(maps))
    print(f"wrote {', '.join(report['files'].values())}")
    return 0
