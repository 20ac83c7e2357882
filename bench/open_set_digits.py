"""Which open-set score tells "none of my classes" best? A tiny ViT that knows only the handwritten digits 0-4, then
unseen digits 5-9 and (when Debian's dataset-fashion-mnist is installed) Fashion-MNIST items as "not a pet".

Each seed trains the tests' open-set digits model (tests/conftest.py train_open_set_digits: digits 0-4 split 541
train / 180 validation / 180 test, ~15 s on one core), fits the temperature and the open set exactly as `petvit train`
does (training/open_set.py fit_trust: class Gaussians on train, temperature and thresholds on validation), and
scores the 180 test images (never used for anything) against the foreign images: AUROC, FPR at 95 % TPR, and at the
stored thresholds the share of test images accepted and of foreign images marked unknown; plus the test ECE before
and after the temperature.

    PYTHONPATH=. .venv/bin/python bench/open_set_digits.py                 # seeds 0-4, ~2 min on one core
    PYTHONPATH=. .venv/bin/python bench/open_set_digits.py --docs          # also copies the PNGs into docs/
    .venv/bin/python bench/kernels.py open_set_digits -- --seeds 0 1 2 3 4  # x the three kernel settings

Prints a table, writes results/open_set_digits.{json,png} and results/calibration_digits.png (git-ignored).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.evidence import machine, spread
from model.inference import batch_outputs
from tests.conftest import OPEN_SET_SEED, OpenSetDigits, train_open_set_digits
from training.calibration import expected_calibration_error, reliability_bins
from training.open_set import Outputs, compare_scores
from training.plots import plot_acceptance_tradeoff, plot_reliability_diagram

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # Debian's dataset-fashion-mnist


def fashion_images(count: int) -> torch.Tensor | None:
    """The first `count` Fashion-MNIST test items as (N, 3, 16, 16) uint8 grey images, or None when not installed."""
    if not FASHION.exists():
        return None
    with gzip.open(FASHION, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)  # idx3 header: magic, count, rows, cols
    items = torch.from_numpy(raw.reshape(-1, 28, 28)[:count].copy())
    # (N, 28, 28) -> (N, 1, 16, 16) area-averaged to the digits' size -> (N, 3, 16, 16) grey RGB
    small = F.interpolate(items[:, None].float(), size=(16, 16), mode="area").round().to(torch.uint8)
    return small.expand(-1, 3, -1, -1).contiguous()


def outputs_of(d: OpenSetDigits, images: torch.Tensor) -> Outputs:
    with torch.no_grad():
        outputs = batch_outputs(d.model, images)
    return Outputs(outputs.logits, outputs.features, torch.full((len(images),), -1))


def tradeoff(table: dict[str, dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per score: (share of in-distribution accepted, share of foreign caught) as the threshold sweeps."""
    curves = {}
    for name, row in table.items():
        inside, outside = np.sort(row["in_scores"]), row["out_scores"]
        thresholds = np.r_[-np.inf, inside, np.inf]
        accepted = np.searchsorted(inside, thresholds, side="right") / len(inside)
        caught = 1 - np.searchsorted(np.sort(outside), thresholds, side="right") / len(outside)
        curves[name] = (accepted, caught)
    return curves


def run_seed(seed: int, fashion: torch.Tensor | None, folder: Path) -> dict[str, Any]:
    d = train_open_set_digits(folder, seed)
    calibration, open_set = d.fields["calibration"], d.fields["open_set"]
    foreign = {"digits 5-9": d.unseen} | ({"Fashion-MNIST": outputs_of(d, fashion)} if fashion is not None else {})
    tables = {name: compare_scores(open_set, calibration, d.test, out) for name, out in foreign.items()}
    test = d.test
    run = {
        "seed": seed,
        "top1": float((test.logits.argmax(-1) == test.targets).float().mean()),
        "temperature": calibration.temperature,
        "ece_before": expected_calibration_error(test.logits.softmax(-1), test.targets),
        "ece_after": expected_calibration_error((test.logits / calibration.temperature).softmax(-1), test.targets),
        "nll_before": F.cross_entropy(test.logits, test.targets).item(),
        "nll_after": F.cross_entropy(test.logits / calibration.temperature, test.targets).item(),
        "tables": tables,
        "reliability": {
            "uncalibrated": reliability_bins(test.logits.softmax(-1), test.targets),
            f"temperature {calibration.temperature:.2f}": reliability_bins(
                (test.logits / calibration.temperature).softmax(-1), test.targets
            ),
        },
    }
    return run | evidence(run, open_set.score)


CLAIMS = {
    "ece_lowered": "temperature scaling lowers the held-out ECE",
    "nll_lowered": "temperature scaling lowers the held-out NLL",
    "chosen_best_digits": "the stored score (mahalanobis) has the best AUROC vs unseen digits 5-9",
    "chosen_auroc_085_digits": "the stored score's AUROC vs unseen digits 5-9 is >= 0.85",
    "chosen_best_fashion": "the stored score (mahalanobis) has the best AUROC vs Fashion-MNIST",
    "accepts_92_98": "at the stored threshold (95 % of validation) 92-98 % of held-out images are accepted",
}


def evidence(run: dict[str, Any], chosen: str) -> dict[str, Any]:
    """The published claims per seed and the measures behind them (bench/kernels.py merges them)."""
    measures = {k: run[k] for k in ("top1", "temperature", "ece_before", "ece_after", "nll_before", "nll_after")}
    claims = {"ece_lowered": run["ece_after"] < run["ece_before"], "nll_lowered": run["nll_after"] < run["nll_before"]}
    for foreign, table in run["tables"].items():
        slug = "digits" if foreign.startswith("digits") else "fashion"
        measures |= {f"auroc_{name}_{slug}": row["auroc"] for name, row in table.items()}
        others = max(row["auroc"] for name, row in table.items() if name != chosen)
        claims[f"chosen_best_{slug}"] = table[chosen]["auroc"] > others
        if slug == "digits":
            claims["chosen_auroc_085_digits"] = table[chosen]["auroc"] >= 0.85
            measures["chosen_in_accepted"] = table[chosen]["in_accepted"]
            claims["accepts_92_98"] = 0.92 <= table[chosen]["in_accepted"] <= 0.98
    return {"measures": measures, "claims": claims}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and range over seeds of every measure, per foreign set and score."""

    keys = ("top1", "temperature", "ece_before", "ece_after", "nll_before", "nll_after")
    out: dict[str, Any] = {k: spread([r[k] for r in runs]) for k in keys}
    for foreign in runs[0]["tables"]:
        out[foreign] = {
            score: {
                key: spread([r["tables"][foreign][score][key] for r in runs])
                for key in ("auroc", "fpr_at_95_tpr", "in_accepted", "out_unknown")
            }
            for score in runs[0]["tables"][foreign]
        }
    return out


def format_table(summary: dict[str, Any], seeds: list[int]) -> str:
    lines = [f"digits 0-4 ViT, {len(seeds)} seeds {seeds}: mean [min, max]"]
    for key in ("top1", "temperature", "ece_before", "ece_after", "nll_before", "nll_after"):
        s = summary[key]
        lines.append(f"  {key:<12} {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]")
    for foreign in (k for k in summary if isinstance(summary[k], dict) and "msp" in summary[k]):
        lines.append(
            f"vs {foreign}:  {'score':<12} {'AUROC':>21} {'FPR@95':>21} {'in accepted':>21} {'out unknown':>21}"
        )
        for score, row in summary[foreign].items():
            cells = " ".join(
                f"{row[k]['mean']:.3f} [{row[k]['min']:.3f}, {row[k]['max']:.3f}]"
                for k in ("auroc", "fpr_at_95_tpr", "in_accepted", "out_unknown")
            )
            lines.append(f"{'':<15}{score:<12} {cells}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """The trade-off curves of the tests' seed (one PNG, a panel per foreign set) and its reliability diagram."""
    run = next((r for r in runs if r["seed"] == OPEN_SET_SEED), runs[0])
    paths = []
    for foreign, table in run["tables"].items():
        marks = {n: (row["in_accepted"], row["out_unknown"]) for n, row in table.items()}
        title = f"digits 0-4 ViT (seed {run['seed']}) vs {foreign}\ndots: the stored thresholds (95 % of val)"
        slug = foreign.split()[0].lower().replace("-", "_")
        paths.append(plot_acceptance_tradeoff(tradeoff(table), out / f"open_set_{slug}.png", marks, title))
    title = f"digits 0-4 ViT (seed {run['seed']}), 180 test images"
    reliability = plot_reliability_diagram(run["reliability"], out / "calibration_digits.png", title)
    return paths[0] if len(paths) == 1 else _side_by_side(paths, out / "open_set_digits.png"), reliability


def _side_by_side(paths: list[Path], target: Path) -> Path:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    canvas.save(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--fashion", type=int, default=2000, help="Fashion-MNIST items to use (0: none)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--docs", action="store_true", help="copy the PNGs into docs/")
    parser.add_argument("--json", type=Path, help="where the JSON goes (default: <out>/open_set_digits.json)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fashion = fashion_images(args.fashion) if args.fashion else None
    with tempfile.TemporaryDirectory() as folder:
        runs = [run_seed(seed, fashion, Path(folder)) for seed in args.seeds]
    summary = summarise(runs)
    print(format_table(summary, args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    tradeoff_png, reliability_png = plot(runs, args.out)
    for run in runs:  # the score arrays stay out of the JSON
        for table in run["tables"].values():
            for row in table.values():
                row.pop("in_scores"), row.pop("out_scores")
    doc = {
        "machine": machine(),
        "seeds": args.seeds,
        "claims": {k: v for k, v in CLAIMS.items() if fashion is not None or not k.endswith("fashion")},
        "fashion_items": 0 if fashion is None else len(fashion),
        "summary": summary,
        "runs": runs,
    }
    json_path = args.json or args.out / "open_set_digits.json"
    json_path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {json_path}, {tradeoff_png}, {reliability_png}")
    if args.docs:
        for png in (tradeoff_png, reliability_png):
            shutil.copy(png, Path(__file__).resolve().parents[1] / "docs" / png.name)


if __name__ == "__main__":
    main()
