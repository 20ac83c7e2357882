"""`petvit train`: the command line over training.loop.train (flags -> TrainConfig, DataConfig, RunConfig).

petvit train --recipe linear-probe --dataset pets --data-dir data --out artifacts/petvit.safetensors
torchrun --nproc-per-node 8 -m cli train --recipe finetune --device cuda ...
petvit train --recipe teacher --arch resnet50 --out artifacts/teacher-resnet50.safetensors
petvit train --recipe distill --teacher artifacts/teacher-resnet50.safetensors --variant s16 --out ...
petvit train --recipe finetune --init artifacts/imported.safetensors --out ...   # from `petvit import`'s backbone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.precision import TRAINING_DTYPE_CHOICES
from model.pretrained import PretrainedWeightsUnavailable
from training.data import AUGMENTATIONS, DataConfig, DatasetUnavailable
from training.distill import DISTILL_MODES
from training.loop import RunConfig, default_recipe, pick_device, train
from training.recipes import INITS, RECIPES, TrainConfig, recipe_config


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=("auto", *RECIPES), default="auto", help="auto: finetune on CUDA, "
                        "linear-probe otherwise; distill: DeiT, a ViT with a distillation token taught by --teacher; "
                        "teacher: a torchvision convnet (--arch) for distill")  # fmt: skip
    parser.add_argument("--dataset", choices=("pets", "folder"), default="pets")
    parser.add_argument("--data-dir", default="data", help="pets: the folder holding oxford-iiit-pet/")
    parser.add_argument("--out", default="artifacts/petvit.safetensors", help="artifact to write")
    parser.add_argument("--if-missing", action="store_true", help="exit 0 at once when --out already exists")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument(
        "--dtype", choices=TRAINING_DTYPE_CHOICES, default="auto", help="autocast dtype; auto: bfloat16 on CUDA"
    )
    parser.add_argument("--variant", help="model variant (recipe default: b16, scratch and distill: ti16)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--augment", choices=AUGMENTATIONS)
    parser.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=None, help="MixUp/CutMix")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--min-crop-scale", type=float, default=0.08)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (keep fixed)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="folder datasets only")
    parser.add_argument(
        "--set", dest="overrides", action="append", type=_parse_override, default=[], metavar="KEY=VALUE",
        help="scratch, distill: override a ViTConfig field, e.g. --set depth=6 --set image_size=128 (teacher: "
        "image_size only)",
    )  # fmt: skip
    parser.add_argument(
        "--teacher",
        metavar="ARTIFACT",
        help="distill: the teacher, a petvit ViT artifact or a convnet teacher artifact",
    )
    parser.add_argument("--distill", choices=DISTILL_MODES, help="distill: hard (the teacher's argmax; default) or "
                        "soft (its tempered distribution)")  # fmt: skip
    parser.add_argument("--distill-tau", type=float, help="distill: soft distillation's temperature (default 3)")
    parser.add_argument("--distill-alpha", type=float, help="distill: the teacher term's weight (default 0.5)")
    parser.add_argument("--arch", help="teacher: a torchvision convnet, e.g. resnet18, resnet50, regnet_y_400mf "
                        "(default resnet50)")  # fmt: skip
    parser.add_argument("--init", metavar="ARTIFACT|" + "|".join(INITS), help="finetune, linear-probe: start from "
                        "this petvit artifact's backbone (e.g. one `petvit import` wrote) with a new head, keeping its "
                        "preprocessing; teacher: torchvision's ImageNet weights (default) or random ones")  # fmt: skip
    parser.add_argument("--output-dir", help="run directory (default: <artifact folder>/runs/<artifact name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last state")
    parser.add_argument("--stop-after", type=int, help="run at most N epochs now; continue later with --resume")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-download", action="store_true", help="never try to download Pets")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the final test-split evaluation")


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, DataConfig, RunConfig]:
    device = pick_device(args.device)
    recipe = default_recipe(device) if args.recipe == "auto" else args.recipe
    cfg = recipe_config(
        recipe,
        variant=args.variant,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        mixup=args.mixup,
        seed=args.seed,
        model_overrides=dict(args.overrides) or None,
        teacher=args.teacher,
        distill=args.distill,
        distill_tau=args.distill_tau,
        distill_alpha=args.distill_alpha,
        arch=args.arch,
        init=args.init,
    )
    data = DataConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        hflip=args.hflip,
        min_crop_scale=args.min_crop_scale,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        download=not args.no_download,
    )
    run = RunConfig(
        out=args.out,
        # Next to the artifact by default: that folder is writable wherever the artifact is (compose volume, PVC).
        output_dir=args.output_dir or str(Path(args.out).parent / "runs" / Path(args.out).stem),
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        resume=args.resume,
        stop_after=args.stop_after,
        evaluate=not args.no_evaluate,
        threads=args.threads,
    )
    return cfg, data, run


def main(args: argparse.Namespace) -> int:
    if args.if_missing and Path(args.out).exists():
        print(f"{args.out} exists; nothing to train (--if-missing)")
        return 0
    try:
        cfg, data, run = configs_from_args(args)
        train(cfg, data, run)
    except DatasetUnavailable as err:
        print(f"petvit train: {err}", file=sys.stderr)
        return 2
    except PretrainedWeightsUnavailable as err:
        hint = "--init random" if args.recipe == "teacher" else "--recipe scratch"
        print(f"petvit train: {err}\n({hint} needs no pretrained weights)", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as err:  # bad settings: unknown variant, wrong recipe for a variant, ...
        print(f"petvit train: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the loss diverged: the message says which setting to change
        print(f"petvit train: {err}; continue from the last good epoch with --resume", file=sys.stderr)
        return 1
    return 0
