"""Temperature scaling (Guo et al. 2017) and the expected calibration error.

After training, one temperature T is fitted on the validation split (never the test split) by minimising the
negative log-likelihood of softmax(logits / T); the service then answers softmax(logits / T). The fit optimises
log T, so T stays positive without a constraint, with L-BFGS: one scalar, a smooth convex-in-practice loss, a few
dozen evaluations over logits that are already computed.

ECE: the images are binned by their top score in ECE_BINS equal-width bins over [0, 1]; ECE is the average, weighted
by bin size, of |accuracy - mean top score| per bin. A perfectly calibrated model's "0.9" is right 90 % of the time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.trust import ECE_BINS, Calibration
from training.plots import plot_reliability_diagram

RELIABILITY_FILE = "reliability_diagram.png"
# Fewer validation images than this and the temperature is refused (T = 1, the model as trained, is kept): on a
# handful of images the NLL is decided by whether one of them is a confident mistake, and T follows it (a 3-image
# validation split raised the ECE from 0.020 to 0.514). On the digits model (tests/conftest.py), temperatures fitted
# on 20 random draws of n validation images gave a held-out ECE up to 0.066 for n = 10 and 0.051 for n = 20 against
# 0.043 at T = 1, and never above 0.044 from n = 30 up; 50 leaves a margin over that.
MIN_CALIBRATION_IMAGES = 50


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on these (held-out) logits (N, C)."""
    if len(targets) == 0:
        raise ValueError("cannot fit a temperature on an empty split")
    logits, targets = logits.detach().double(), targets.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = 1 to start: "as trained"
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():  # finish() may run under no_grad; the fit needs its one gradient
        optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per confidence bin: its range, images, mean top score and accuracy (None for an empty bin)."""
    confidence, predicted = probs.float().max(dim=-1)  # (N,), (N,)
    correct = (predicted == targets).float()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 (impossible for a softmax) in bin 0.
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "confidence": float(confidence[members].mean()) if n else None,
                "accuracy": float(correct[members].mean()) if n else None,
            }
        )
    return rows


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of probabilities (N, C) against integer targets (N,), with `bins` equal-width bins."""
    rows = reliability_bins(probs, targets, bins)
    total = sum(r["count"] for r in rows)
    if total == 0:
        raise ValueError("cannot measure calibration on an empty split")
    return sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / total


def too_few_for_a_temperature(num_images: int, split: str = "val") -> str | None:
    """Why a temperature fitted on this many images is refused, or None when there are enough."""
    if num_images >= MIN_CALIBRATION_IMAGES:
        return None
    return (
        f"calibration refused: the {split} split has {num_images} images, fewer than the {MIN_CALIBRATION_IMAGES} a "
        "temperature needs (on a few images one confident mistake decides it); keeping temperature 1 (the model as "
        "trained). Raise --val-fraction or add images to calibrate."
    )


def fit_calibration(logits: torch.Tensor, targets: torch.Tensor, split: str = "val") -> Calibration:
    """Fit the temperature on these held-out logits and record the ECE before and after it. Under
    MIN_CALIBRATION_IMAGES images the temperature is 1 (refused: too_few_for_a_temperature says why)."""
    temperature = 1.0 if too_few_for_a_temperature(len(targets), split) else fit_temperature(logits, targets)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(logits.float().softmax(-1), targets),
        ece_after=expected_calibration_error((logits.float() / temperature).softmax(-1), targets),
        split=split,
        num_images=len(targets),
    )


def calibration_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    calibration: Calibration | None,
    output_dir: str | Path | None = None,
    title: str = "",
) -> dict[str, Any]:
    """ECE of these (test) logits before and after the artifact's temperature (after = before without one), and
    the reliability diagram PNG of both in output_dir."""
    temperature = calibration.temperature if calibration else 1.0
    before, after = logits.float().softmax(-1), (logits.float() / temperature).softmax(-1)
    report: dict[str, Any] = {
        "temperature": calibration.temperature if calibration else None,
        "bins": ECE_BINS,
        "ece_before": expected_calibration_error(before, targets),
        "ece_after": expected_calibration_error(after, targets),
        "reliability": {"before": reliability_bins(before, targets), "after": reliability_bins(after, targets)},
    }
    if output_dir is not None:
        curves = {"uncalibrated": report["reliability"]["before"]}
        if calibration is not None:
            curves[f"temperature {temperature:.2f}"] = report["reliability"]["after"]
        path = plot_reliability_diagram(curves, Path(output_dir) / RELIABILITY_FILE, title=title)
        report["file"] = str(path)
    return report


__all__ = [
    "MIN_CALIBRATION_IMAGES",
    "RELIABILITY_FILE",
    "calibration_report",
    "expected_calibration_error",
    "fit_calibration",
    "fit_temperature",
    "reliability_bins",
    "too_few_for_a_temperature",
]
