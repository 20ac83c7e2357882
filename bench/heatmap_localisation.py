"""The localisation test's table over several seeds: how much the heatmap methods' scores move between trainings.

    .venv/bin/python bench/heatmap_localisation.py                  # seeds 0 1 2, about 15 s of training each
    .venv/bin/python bench/kernels.py heatmap_localisation -- --seeds 0 1 2 3 4   # x the three kernel settings

Seed s draws the train/test split of scikit-learn's digits, the pasting (places and texture) and the ViT's init;
seed 0 is tests/training/test_heatmaps.py's run. Same task, model and training as that test (its helpers are
imported from it), scored with training/heatmaps.py. Prints each seed's table and the per-method range, and
writes results/heatmap_localisation.json (git-ignored): the machine, each seed's tables, and the test's claims
per seed (bench/kernels.py merges them over kernel settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.evidence import machine
from model.explain import DEFAULT_METHOD, PLAIN_ROLLOUT, SERVICE_METHODS, measured_methods
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
    untrained = ViT(localisation_config()).eval()
    torch.manual_seed(seed)
    model = ViT(localisation_config())
    train(model, train_set)
    with torch.no_grad():
        accuracy = (model(test_set.images).argmax(-1) == test_set.labels).float().mean().item()
    summary = score_heatmaps(model, batches(test_set), measured_methods()).summary()
    before = score_heatmaps(untrained, batches(test_set), measured_methods()).summary()
    return {"seed": seed, "top1": accuracy, **summary, "untrained": before, **evidence(accuracy, summary, before)}


CLAIMS = {
    "learns": "the ViT learns the pasted digits (held-out top-1 >= 0.7)",
    "service_methods_point": "every service heatmap method points at the digit in >= 80 % of images (chance 11 %)",
    "default_sharper_than_plain": "the default method puts >= 0.2 more of its heat on the digit than plain rollout",
    "default_best_pointing": "the default method's pointing is the best measured, within 0.01",
    "default_best_mass": "the default method's mass on the digit is the best measured, within 0.03",
    "training_makes_the_difference": "the default method points >= 0.3 better trained than untrained",
}


def evidence(accuracy: float, summary: dict, untrained: dict) -> dict:
    """The test's claims, per run, and the measures behind them (bench/kernels.py merges them)."""
    methods, chance = summary["methods"], summary["baseline"]["random_cell"]
    default = methods[SERVICE_METHODS[DEFAULT_METHOD].key]
    service = [methods[m.key] for m in SERVICE_METHODS.values()]
    measures = {
        "top1": accuracy,
        "default_pointing": default["pointing"],
        "default_mass": default["mass"],
        "plain_rollout_mass": methods[PLAIN_ROLLOUT.key]["mass"],
        "worst_service_pointing": min(m["pointing"] for m in service),
        "best_pointing": max(m["pointing"] for m in methods.values()),
        "best_mass": max(m["mass"] for m in methods.values()),
        "untrained_default_pointing": untrained["methods"][SERVICE_METHODS[DEFAULT_METHOD].key]["pointing"],
        "chance": chance,
    }
    claims = {
        "learns": accuracy >= 0.7,
        "service_methods_point": measures["worst_service_pointing"] >= 0.8,
        "default_sharper_than_plain": default["mass"] >= measures["plain_rollout_mass"] + 0.2,
        "default_best_pointing": default["pointing"] >= measures["best_pointing"] - 0.01,
        "default_best_mass": default["mass"] >= measures["best_mass"] - 0.03,
        "training_makes_the_difference": default["pointing"] >= measures["untrained_default_pointing"] + 0.3,
    }
    return {"measures": measures, "claims": claims}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", "--out", type=Path, default=Path("results/heatmap_localisation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "seeds": args.seeds, "claims": CLAIMS, "runs": runs}
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
