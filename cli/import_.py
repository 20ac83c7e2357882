"""`petvit import`: a published timm / Hugging Face ViT or DeiT checkpoint -> a petvit artifact, exactly.

petvit import hf-hub:ORG/NAME --out artifacts/imported.safetensors
petvit import hf-hub:ORG/NAME@REVISION --out ...          # a branch, tag or commit
petvit import path/to/folder --out ...                   # config.json + model.safetensors [+ preprocessor_config.json]
HF_HOME=/cache HF_HUB_OFFLINE=1 petvit import hf-hub:ORG/NAME --out ...   # from a pre-filled hub cache, no network
petvit import hf-hub:ORG/PETS-FINETUNE --labels pets --out ...   # petvit's breed names and class order
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.checkpoints import UnsupportedCheckpoint
from model.hub_import import LABEL_CHOICES, ImportSourceError, import_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="hf-hub:ORG/NAME[@REVISION], or a hub-layout folder")
    parser.add_argument("--out", type=Path, required=True, help="artifact to write (.safetensors)")
    parser.add_argument("--name", help="the artifact's name (default: the repo or folder name)")
    parser.add_argument(
        "--labels",
        choices=LABEL_CHOICES,
        default="published",
        help="published: the checkpoint's labels and class order (default); pets: a 37-breed Pets head renamed to "
        "petvit's breed names in petvit's class order (exact), to evaluate it or distil from it like a petvit model",
    )


def main(args: argparse.Namespace) -> int:
    try:
        path, meta = import_checkpoint(args.source, args.out, args.name, args.labels)
    except UnsupportedCheckpoint as err:
        print(f"petvit import: {args.source} is not supported: {err}", file=sys.stderr)
        return 2
    except ImportSourceError as err:
        print(f"petvit import: {err}", file=sys.stderr)
        return 2
    pre, config = meta.preprocessing, meta.config
    crop = "no crop" if pre.resize_mode == "squash" and pre.resize_size == pre.image_size else f"crop {pre.image_size}"
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {meta.provenance['library']} "
        f"{meta.provenance['architecture']}, {config.num_classes} classes ({', '.join(meta.labels[:3])}, ...), "
        f"{'distilled, ' if config.distilled else ''}depth {config.depth}, width {config.hidden_dim}; "
        f"preprocessing: {pre.resize_mode} resize to {pre.resize_size}, {crop}, {pre.interpolation}, "
        f"mean {list(pre.mean)} std {list(pre.std)}"
    )
    return 0
