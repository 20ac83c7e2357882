"""Do the heatmaps point at the object? Pointing game and heat mass on a mask, per heatmap method, beside the
baseline of a map that knows nothing.

Masks are compared with the heatmap on the heatmap's own grid: each patch cell gets the share of its pixels that
are on the object (`pool_mask`). The heatmap holds one number per patch, so this is exact: upsampling the heatmap
to pixels instead would score an interpolation the model never made. Per image:

- pointing: 1 when the heatmap's hottest cell is mostly (>= half) on the object. Cells tied at the maximum share the
  credit, so a flat map scores exactly what a randomly chosen cell would (`random_cell` below).
- mass: the heat on the object over all the heat, each cell's heat weighted by its object share. A flat map scores
  exactly the object's area fraction.
- baselines: `area_fraction` (the object's share of the crop the model saw: the mass of a flat map, and the chance
  that a random pixel is on the object) and `random_cell` (the chance that a random cell counts as a hit).

`petvit evaluate --heatmaps` (training/evaluate.py) and the localisation test (tests/training/test_heatmaps.py) both
use `score_heatmaps`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.explain import DEFAULT_METHOD, PLAIN_ROLLOUT, SERVICE_METHODS, HeatmapMethod, heatmaps, measured_methods
from model.rollout import upsample_heatmap
from model.vit import ViT
from training.data import DataConfig, pets_with_masks
from training.plots import plot_heatmap_examples

HIT_SHARE = 0.5  # a cell counts as "on the object" when at least half its pixels are
EXAMPLES_FILE = "heatmap_examples.png"
EXAMPLE_COUNT = 6
MASK_NOTE = (
    "Oxford-IIIT Pet trimap, pet + boundary, resized and centre-cropped with the image (eval transform, nearest "
    "neighbour), pooled to the patch grid"
)


def pool_mask(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool or 0/1 masks -> (B, rows, cols): the share of each patch cell's pixels on the object."""
    H, W = masks.shape[-2:]
    rows, cols = grid
    if H % rows or W % cols:
        raise ValueError(f"a {H}x{W} mask does not split into a {rows}x{cols} grid of equal cells")
    # (B, H, W) -> (B, 1, H, W) for avg_pool2d -> (B, 1, rows, cols) -> (B, rows, cols)
    return F.avg_pool2d(masks.float()[:, None], kernel_size=(H // rows, W // cols))[:, 0]


def pointing_hits(maps: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) heatmaps and object shares -> (B,) pointing-game score in [0, 1] (ties share the credit)."""
    heat, share = maps.flatten(1).float(), cover.flatten(1)  # (B, rows, cols) -> (B, N)
    # A tolerance far below any real difference between cells, and far above float32 rounding of values in [0, 1].
    peaks = heat >= heat.amax(dim=1, keepdim=True) - 1e-6
    hits = peaks & (share >= HIT_SHARE)
    return hits.sum(dim=1) / peaks.sum(dim=1)


def mass_on_mask(maps: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) heatmaps and object shares -> (B,) share of the heat on the object. An all-zero map (no
    flow at all) counts as flat: it prefers nothing, so it scores the area fraction."""
    heat, share = maps.flatten(1).float(), cover.flatten(1)  # (B, rows, cols) -> (B, N)
    total = heat.sum(dim=1)
    mass = (heat * share).sum(dim=1) / total.clamp_min(torch.finfo(heat.dtype).tiny)
    return torch.where(total > 0, mass, share.mean(dim=1))


def area_fraction(cover: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) object shares -> (B,) the object's share of the image (cells are equal, so the mean)."""
    return cover.flatten(1).mean(dim=1)


def random_cell(cover: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) object shares -> (B,) the chance that a uniformly random cell is a pointing-game hit."""
    return (cover.flatten(1) >= HIT_SHARE).float().mean(dim=1)


@dataclass
class HeatmapScores:
    """Running sums of each method's pointing and mass, and of the baselines, over the images scored so far."""

    images: int = 0
    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_sums: dict[str, float] = field(default_factory=lambda: {"area_fraction": 0.0, "random_cell": 0.0})

    def add(self, maps: dict[str, torch.Tensor], cover: torch.Tensor) -> None:
        """One batch: {method key: (B, rows, cols)} heatmaps and the (B, rows, cols) object shares."""
        cover = cover.float().cpu()
        self.images += cover.shape[0]
        self.baseline_sums["area_fraction"] += area_fraction(cover).sum().item()
        self.baseline_sums["random_cell"] += random_cell(cover).sum().item()
        for key, grid in maps.items():
            grid = grid.float().cpu()
            sums = self.sums.setdefault(key, {"pointing": 0.0, "mass": 0.0})
            sums["pointing"] += pointing_hits(grid, cover).sum().item()
            sums["mass"] += mass_on_mask(grid, cover).sum().item()

    def summary(self) -> dict[str, Any]:
        """Means over the images: {"num_images", "baseline": {...}, "methods": {key: {"pointing", "mass"}}}."""
        n = max(self.images, 1)
        return {
            "num_images": self.images,
            "baseline": {k: v / n for k, v in self.baseline_sums.items()},
            "methods": {key: {k: v / n for k, v in sums.items()} for key, sums in self.sums.items()},
        }


def score_heatmaps(
    model: ViT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    methods: Sequence[HeatmapMethod] | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> HeatmapScores:
    """Score every method on (images (B, 3, S, S) uint8, masks (B, S, S) bool) batches; model in eval mode.

    Gradient rollout explains each image's predicted class, as the service does.
    """
    model.eval()
    device = torch.device(device)
    methods = list(methods) if methods is not None else measured_methods()
    scores = HeatmapScores()
    for images, masks in batches:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, maps = heatmaps(model, images.to(device), methods)
        grid = next(iter(maps.values())).shape[-2:]
        scores.add(maps, pool_mask(masks, (grid[0], grid[1])))
    return scores


def service_method_keys() -> dict[str, str]:
    """{service name: report key}: which rows of the table POST /classify's heatmap_method values are."""
    return {name: method.key for name, method in SERVICE_METHODS.items()}


def shown_methods() -> dict[str, str]:
    """The columns of the examples PNG: {title: report key}, the service's methods (default first) and the plain
    rollout the service used before, for comparison."""
    names = sorted(SERVICE_METHODS, key=lambda name: name != DEFAULT_METHOD)
    shown = {f"{name} ({SERVICE_METHODS[name].key})": SERVICE_METHODS[name].key for name in names}
    if PLAIN_ROLLOUT.key not in shown.values():
        shown[f"plain rollout ({PLAIN_ROLLOUT.key})"] = PLAIN_ROLLOUT.key
    return shown


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a text table, best pointing first (ties: more mass), baselines last."""
    services = {key: name for name, key in service_method_keys().items()}
    rows = sorted(summary["methods"].items(), key=lambda kv: (-kv[1]["pointing"], -kv[1]["mass"]))
    lines = [f"{'method':<22} {'pointing':>8} {'mass':>6}  service"]
    for key, values in rows:
        lines.append(f"{key:<22} {values['pointing']:>8.3f} {values['mass']:>6.3f}  {services.get(key, '')}".rstrip())
    base = summary["baseline"]
    lines.append(f"{'baseline: random cell':<22} {base['random_cell']:>8.3f} {'':>6}")
    lines.append(f"{'baseline: area':<22} {base['area_fraction']:>8.3f} {base['area_fraction']:>6.3f}")
    return "\n".join(lines)


def method_by_key() -> dict[str, HeatmapMethod]:
    """Every method the table or the service has, by report key."""
    return {m.key: m for m in [*measured_methods(), *SERVICE_METHODS.values()]}


def plot_examples(
    model: ViT,
    items: Sequence[tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    title: str = "",
) -> Path:
    """The PNG grid for (image (3, S, S) uint8, mask (S, S) bool) pairs: photo, mask, the shown methods' heatmaps
    (bilinear to the crop, as the service draws them), each captioned with its pointing score and mass."""
    device = torch.device(device)
    images = torch.stack([image for image, _ in items])  # (n, 3, S, S)
    masks = torch.stack([mask for _, mask in items])  # (n, S, S)
    shown = shown_methods()
    known = method_by_key()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        _, maps = heatmaps(model, images.to(device), [known[key] for key in dict.fromkeys(shown.values())])
    size = (images.shape[-2], images.shape[-1])
    panels: dict[str, Sequence[np.ndarray]] = {}
    notes: dict[str, Sequence[str]] = {}
    for name, key in shown.items():
        grid = maps[key].float().cpu()
        cover = pool_mask(masks, (grid.shape[-2], grid.shape[-1]))
        panels[name] = list(upsample_heatmap(grid, size).numpy())
        hits, mass = pointing_hits(grid, cover), mass_on_mask(grid, cover)
        notes[name] = [f"pointing {h:.2g}, mass {m:.2f}" for h, m in zip(hits.tolist(), mass.tolist(), strict=True)]
    photos = list(images.permute(0, 2, 3, 1).numpy())  # (n, 3, S, S) -> (n, S, S, 3) for imshow
    return plot_heatmap_examples(photos, list(masks.numpy()), panels, path, notes, title)


def evenly_spaced(total: int, count: int) -> list[int]:
    """count positions spread over 0..total-1 (all of them when count is 0 or covers it): Pets' lists are sorted by
    breed, so a prefix would be a few breeds only."""
    if count <= 0 or count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def evaluate_heatmaps(
    model: ViT,
    data: DataConfig,
    split: str,
    output_dir: str | Path,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    max_images: int = 0,
) -> dict[str, Any]:
    """Score every method's heatmaps against Pets' pet masks on `split` (max_images > 0: an evenly spaced sample),
    write the examples PNG into output_dir, and return the report's "heatmaps" section."""
    if data.dataset != "pets":
        raise ValueError(
            f"heatmap evaluation needs object masks, which only Oxford-IIIT Pet has (its trimaps); this model's "
            f"data is a {data.dataset!r} dataset. Evaluate on --dataset pets, or leave --heatmaps off"
        )
    full = pets_with_masks(data, split)
    dataset = full.subset(evenly_spaced(len(full), max_images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    batches = ((images, masks) for images, masks, _ in tqdm(loader, desc="heatmaps", unit="batch", leave=False))
    summary = score_heatmaps(model, batches, measured_methods(), device, autocast_dtype).summary()
    picks = evenly_spaced(len(dataset), EXAMPLE_COUNT)
    path = plot_examples(
        model,
        [dataset[i][:2] for i in picks],
        Path(output_dir) / EXAMPLES_FILE,
        device,
        autocast_dtype,
        title=f"heatmaps on Oxford-IIIT Pet {split} (cyan: the pet's outline)",
    )
    grid = model.config.grid_size
    return {
        **summary,
        "split": split,
        "of_images": len(full),
        "grid": [grid, grid],
        "mask": MASK_NOTE,
        "target": "gradient rollout explains each image's predicted class",
        "service_methods": service_method_keys(),
        "default": DEFAULT_METHOD,
        "file": str(path),
    }
