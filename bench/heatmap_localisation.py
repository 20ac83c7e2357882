"""The localisation test's table over several seeds: how much the heatmap methods' scores move between trainings.

    .venv/bin/python bench/heatmap_localisation.py                  # seeds 0 1 2, about 15 s of training each

Seed s draws the train/test split of scikit-learn's digits, the pasting (places and texture) and the ViT's init;
seed 0 is tests/training/test_heatmaps.py's run. Same task, model and training as that test (its helpers are
imported from it), scored with training/heatmaps.py. Prints each seed's table and the per-method range, and
writes results/heatmap_localisation.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from model.explain import measured_methods
from model.vit import ViT
from tests.training.test_heatmaps import batches, localisation_config, paste_digits, train
from training.heatmaps import format_table, score_heatmaps


def run(seed: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    train_rows, test_rows = order[:1400], order[1400:]
    train_set = paste_digits(digits.images[train_rows], digits.target[train_rows], seed=1 + 10 * seed)
    test_set = paste_digits(digits.images[test_rows], digits.target[test_rows], seed=2 + 10 * seed)
    torch.manual_seed(seed)
    model = ViT(localisation_config())
    train(model, train_set)
    with torch.no_grad():
        accuracy = (model(test_set.images).argmax(-1) == test_set.labels).float().mean().item()
    return {"seed": seed, "top1": accuracy, **score_heatmaps(model, batches(test_set), measured_methods()).summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results/heatmap_localisation.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for seed in args.seeds:
        runs.append(run(seed))
        print(f"seed {seed}: top-1 {runs[-1]['top1']:.3f}\n{format_table(runs[-1])}\n")
    print(f"{'method':<22} {'pointing min-max':>17} {'mass min-max':>13} {'mass mean':>9}")
    for key in runs[0]["methods"]:
        points = [r["methods"][key]["pointing"] for r in runs]
        masses = [r["methods"][key]["mass"] for r in runs]
        print(
            f"{key:<22} {min(points):>8.3f}-{max(points):.3f} {min(masses):>6.3f}-{max(masses):.3f} "
            f"{np.mean(masses):>9.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
