"""`petvit import`: a published timm / Hugging Face ViT or DeiT checkpoint -> a petvit artifact, exactly.

petvit import hf-hub:ORG/NAME --out artifacts/imported.safetensors
petvit import hf-hub:ORG/NAME@REVISION --out ...          # a branch, tag or commit
petvit import path/to/folder --out ...                   # config.json + model.safetensors [+ preprocessor_config.json]
HF_HOME=/cache HF_HUB_OFFLINE=1 petvit import hf-hub:ORG/NAME --out ...   # from a pre-filled hub cache, no network
petvit import hf-hub:ORG/PETS-FINETUNE --labels pets --out ...   # petvit's breed names and class order
petvit import hf-hub:openai/clip-vit-base-patch16 --zero-shot pets --out ...  # a CLIP text-tower head, no training
petvit import CLIP_FOLDER --zero-shot classes.txt --template "a photo of a {}." --out ...  # your classes, one prompt
petvit import hf-hub:facebook/dinov2-small --out ...   # an untrained backbone for `petvit train --init`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.convert.checkpoints import UnsupportedCheckpoint
from model.convert.hub import LABEL_CHOICES, ImportOptions, ImportSourceError, import_checkpoint
from model.convert.zero_shot import DEFAULT_TEMPLATES, ZeroShotError


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
    parser.add_argument(
        "--zero-shot",
        metavar="pets|LABELS_FILE",
        help="CLIP only: the head is the text tower's embedding of each class's prompts (no training). pets: the 37 "
        "breeds in petvit's order; or a text file with one class name per line, put into the prompts as written",
    )
    parser.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help="with --zero-shot, a prompt ({} stands for the class name); repeat for an ensemble. Replaces the default "
        f"ensemble of {len(DEFAULT_TEMPLATES)} pet prompts (docs/models.md lists them; the artifact stores them)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="CLIP/DINOv2: the input side in pixels (default: the processor's crop, e.g. 224 for DINOv2, whose "
        "position embeddings, learned at 518, are resampled as transformers resamples them)",
    )


def main(args: argparse.Namespace) -> int:
    if args.template and args.zero_shot is None:
        print("petvit import: --template applies with --zero-shot only", file=sys.stderr)
        return 2
    if args.zero_shot is not None and args.labels != "published":
        print("petvit import: --zero-shot names its own classes; leave out --labels", file=sys.stderr)
        return 2
    templates = tuple(args.template) if args.template else DEFAULT_TEMPLATES
    options = ImportOptions(args.labels, args.zero_shot, templates, args.image_size)
    try:
        path, meta = import_checkpoint(args.source, args.out, args.name, options=options)
    except UnsupportedCheckpoint as err:
        print(f"petvit import: {args.source} is not supported: {err}", file=sys.stderr)
        return 2
    except (ImportSourceError, ZeroShotError) as err:
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
        + (
            ""
            if meta.trained
            else "; no classifier: an untrained head, for `petvit train --init` (linear-probe, finetune)"
        )
    )
    return 0
