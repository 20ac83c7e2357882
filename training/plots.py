"""PNG figures people look at after a run: the confusion matrix and the training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display (containers, CI, torchrun workers)
import matplotlib.pyplot as plt
import numpy as np


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts kept in the title."""
    cm = np.asarray(confusion, dtype=float)
    # Row-normalise so rare and common classes read on the same 0..1 scale; empty rows stay zero.
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    side = max(5.0, 0.28 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} images, rows normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss (train, val) and accuracy (train, val) per epoch, plus the LR; marks the best epoch."""
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.8))
    epochs = [h["epoch"] for h in history]

    def series(key: str) -> list[float]:
        return [h.get(key, float("nan")) if h.get(key) is not None else float("nan") for h in history]

    ax_loss.plot(epochs, series("train_loss"), "o-", label="train")
    ax_loss.plot(epochs, series("val_loss"), "s-", label="held-out")
    ax_loss.set_title("loss")
    ax_acc.plot(epochs, series("train_top1"), "o-", label="train")
    ax_acc.plot(epochs, series("val_top1"), "s-", label="held-out")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("top-1 accuracy")
    if history:
        best = max(history, key=lambda h: h.get("val_top1") or 0.0)
        ax_acc.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch {best['epoch']}")
    ax_lr.plot(epochs, series("lr"), "o-")
    ax_lr.set_title("learning rate (end of epoch)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_heatmap_examples(
    photos: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    maps: dict[str, Sequence[np.ndarray]],
    path: str | Path,
    notes: dict[str, Sequence[str]] | None = None,
    title: str = "",
) -> Path:
    """One row per image: the photo, its object mask, then each method's heatmap over the photo.

    photos: (S, S, 3) uint8; masks: (S, S) bool; maps: {column title: (S, S) heat in [0, 1] per image}, already
    upsampled to the photo; notes: {column title: a caption per image} (e.g. the pointing result). The mask's
    outline is drawn on every heatmap, so the eye can judge what the numbers judge.
    """
    notes = notes or {}
    rows, cols = len(photos), 2 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * max(rows, 1)), squeeze=False)
    for r, (photo, mask) in enumerate(zip(photos, masks, strict=True)):
        axes[r, 0].imshow(photo)
        # The mask column: the photo with everything off the object dimmed, so the outline's shape reads.
        axes[r, 1].imshow(np.where(mask[..., None], photo, (photo * 0.25).astype(np.uint8)))
        for c, (name, heats) in enumerate(maps.items(), start=2):
            ax = axes[r, c]
            ax.imshow(photo)
            ax.imshow(heats[r], cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            if name in notes:
                ax.set_xlabel(notes[name][r], fontsize=7)
    for c, name in enumerate(["photo", "mask", *maps]):
        axes[0, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_reliability_diagram(curves: dict[str, Sequence[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Accuracy against mean top score per confidence bin (training/calibration.py's reliability_bins), one line per
    curve ("uncalibrated", "temperature 1.8"), with the diagonal a calibrated model follows and each bin's share of
    images below."""
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.2, 6.0), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for (name, rows), marker in zip(curves.items(), "os^v", strict=False):
        filled = [r for r in rows if r["count"]]
        ax.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], f"{marker}-", label=name)
        total = max(sum(r["count"] for r in rows), 1)
        centres = [(r["low"] + r["high"]) / 2 for r in rows]
        ax_count.plot(centres, [r["count"] / total for r in rows], f"{marker}-", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability diagram")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_count.set_xlabel("top score (confidence)")
    ax_count.set_ylabel("share of images")
    ax_count.grid(alpha=0.3)
    return _save(fig, path)


def plot_score_histograms(
    scores: dict[str, dict[str, np.ndarray]],
    thresholds: dict[str, float | None],
    path: str | Path,
    notes: dict[str, str] | None = None,
    title: str = "",
) -> Path:
    """One panel per open-set score: histograms of the in-distribution and out-of-distribution images' scores
    (higher = more unusual), the threshold as a vertical line. scores: {score: {"in": (N,), "out": (M,)}}."""
    notes = notes or {}
    fig, axes = plt.subplots(1, len(scores), figsize=(4.3 * len(scores), 3.4), squeeze=False)
    for ax, (name, parts) in zip(axes[0], scores.items(), strict=True):
        both = np.concatenate([parts["in"], parts["out"]])
        edges = np.histogram_bin_edges(both, bins=40)
        ax.hist(parts["in"], bins=edges, alpha=0.6, density=True, label="in distribution")
        ax.hist(parts["out"], bins=edges, alpha=0.6, density=True, label="out of distribution")
        if thresholds.get(name) is not None:
            ax.axvline(thresholds[name], color="black", linestyle="--", label="threshold")
        ax.set_title(f"{name}{': ' + notes[name] if name in notes else ''}", fontsize=9)
        ax.set_xlabel("score (higher: less like any class)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_acceptance_tradeoff(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    marks: dict[str, tuple[float, float]] | None = None,
    title: str = "",
) -> Path:
    """The open-set trade-off per score: share of in-distribution images accepted (x) against share of
    out-of-distribution images caught as unknown (y), as the threshold moves; marks: the chosen operating points."""
    fig, ax = plt.subplots(figsize=(5.4, 4.4))
    for name, (accepted, caught) in curves.items():
        (line,) = ax.plot(accepted, caught, label=name)
        if marks and name in marks:
            ax.plot(*marks[name], "o", color=line.get_color())
    ax.set_xlabel("in-distribution images accepted")
    ax.set_ylabel("out-of-distribution images marked unknown")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "open-set trade-off", fontsize=9)
    return _save(fig, path)
