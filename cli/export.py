"""`petvit export`: write an artifact of any variant, untrained (benchmarks, smoke tests) or ImageNet-initialised."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.config import VARIANTS
from model.convert.pretrained import PretrainedWeightsUnavailable
from model.export import export_artifact
from model.labels import NUM_PET_CLASSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="ti16", help=f"one of {', '.join(VARIANTS)} (default ti16)")
    parser.add_argument("--init", choices=("random", "imagenet"), default="random")
    parser.add_argument("--num-classes", type=int, default=NUM_PET_CLASSES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="artifact path (.safetensors)")


def main(args: argparse.Namespace) -> int:
    try:
        path = export_artifact(args.variant, args.out, args.init, args.num_classes, args.seed)
    except (PretrainedWeightsUnavailable, KeyError, ValueError) as err:
        # KeyError's str() quotes its message; take the argument itself so the line reads cleanly.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"petvit export: {message}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
