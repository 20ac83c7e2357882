"""`petvit train`: the command line over training.loop.train (flags -> TrainConfig, DataConfig, RunConfig).

petvit train --recipe linear-probe --dataset pets --data-dir data --out artifacts/petvit.safetensors
torchrun --nproc-per-node 8 -m cli train --recipe finetune --device cuda ...
petvit train --recipe teacher --arch resnet50 --out artifacts/teacher-resnet50.safetensors
petvit train --recipe distill --teacher artifacts/teacher-resnet50.safetensors --variant s16 --out ...
petvit train --recipe finetune --init artifacts/imported.safetensors --out ...   # from `petvit import`'s backbone
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.flags import add_flags, flag_values
from model.convert.pretrained import PretrainedWeightsUnavailable
from training.data import DataConfig, DatasetUnavailable
from training.loop import RunConfig, default_recipe, pick_device, train
from training.recipes import TrainConfig, recipe_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Each setting is declared once, on its dataclass field ("help" metadata); cli/flags.py derives the flags.
    what = parser.add_argument_group("what to train", "not given: the recipe's default")
    add_flags(what, TrainConfig, unset=True)
    add_flags(parser.add_argument_group("data"), DataConfig)
    run = parser.add_argument_group("run")
    add_flags(run, RunConfig)
    run.add_argument("--if-missing", action="store_true", help="exit 0 at once when --out already exists")


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, DataConfig, RunConfig]:
    device = pick_device(args.device)
    given = flag_values(args, TrainConfig)
    recipe = given.pop("recipe")
    cfg = recipe_config(default_recipe(device) if recipe == "auto" else recipe, **given)
    run = flag_values(args, RunConfig)
    # Next to the artifact by default: that folder is writable wherever the artifact is (compose volume, PVC).
    run["output_dir"] = run["output_dir"] or str(Path(args.out).parent / "runs" / Path(args.out).stem)
    return cfg, DataConfig(**flag_values(args, DataConfig)), RunConfig(**run)


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
