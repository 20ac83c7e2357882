"""training/heatmaps.py: the measures by hand, and on a localisation task built from real handwritten digits, where
the answer is known: a trained ViT's heatmaps must point at the digit far more often than chance does.

The task: scikit-learn's real 8x8 digits, upscaled to 16x16, pasted at a random patch-aligned place on a 48x48
canvas of random texture (area fraction 1/9). The texture carries no label, so a model that classifies the digits
must find them. Patch-aligned places (25 of them) keep the task learnable by a 2-block ViT in about 15 s on one
CPU thread; at any pixel offset it needs minutes, since each patch would see the digit cut at a different place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import ViTConfig
from model.explain import DEFAULT_METHOD, PLAIN_ROLLOUT, SERVICE_METHODS, measured_methods
from model.vit import ViT
from training.heatmaps import (
    HeatmapScores,
    area_fraction,
    evenly_spaced,
    format_table,
    mass_on_mask,
    pointing_hits,
    pool_mask,
    random_cell,
    score_heatmaps,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CANVAS, SCALE, PATCH = 48, 2, 8  # 16x16 digits on 48x48: a 6x6 patch grid, the digit on 2x2 cells of it


# ---------------------------------------------------------------------------------------------- the measures
def test_pool_mask_gives_each_cell_its_share_of_object_pixels() -> None:
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, :3] = True  # row 0: three pixels, two in cell (0, 0), one in cell (0, 1)
    mask[0, 2:, 2:] = True  # cell (1, 1) full
    expected = torch.tensor([[[0.5, 0.25], [0.0, 1.0]]])
    torch.testing.assert_close(pool_mask(mask, (2, 2)), expected)
    with pytest.raises(ValueError, match="equal cells"):
        pool_mask(mask, (3, 3))


def test_pointing_mass_and_baselines_by_hand() -> None:
    cover = torch.tensor([[[1.0, 0.5], [0.25, 0.0]]]).expand(4, 2, 2)  # cells (0,0), (0,1) count as on the object
    maps = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.0]],  # peak on the object
            [[0.0, 0.0], [0.0, 1.0]],  # peak off it
            [[1.0, 1.0], [1.0, 1.0]],  # flat: four tied peaks, two hits
            [[0.0, 0.0], [0.0, 0.0]],  # no flow at all: flat too
        ]
    )
    torch.testing.assert_close(pointing_hits(maps, cover), torch.tensor([1.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(mass_on_mask(maps, cover), torch.tensor([1.0, 0.0, 0.4375, 0.4375]))
    torch.testing.assert_close(area_fraction(cover), torch.full((4,), 0.4375))  # (1 + 0.5 + 0.25) / 4
    torch.testing.assert_close(random_cell(cover), torch.full((4,), 0.5))
    # Half the heat on a full cell, half on a quarter-covered one: 0.5 * 1 + 0.5 * 0.25.
    torch.testing.assert_close(mass_on_mask(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), cover[:1]), torch.tensor([0.625]))


def test_scores_average_over_batches() -> None:
    scores = HeatmapScores()
    cover = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    scores.add({"m": torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])}, cover)
    scores.add({"m": torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])}, cover)
    summary = scores.summary()
    assert summary["num_images"] == 2
    assert summary["methods"]["m"] == {"pointing": 0.5, "mass": 0.5}
    assert summary["baseline"] == {"area_fraction": 0.25, "random_cell": 0.25}


def test_evenly_spaced_samples_span_the_list() -> None:
    assert evenly_spaced(10, 0) == list(range(10)) == evenly_spaced(10, 12)
    assert evenly_spaced(3669, 4) == [0, 1223, 2445, 3668]
    assert evenly_spaced(5, 1) == [2]


# ---------------------------------------------------------------------------------------------- localisation task
@dataclass
class Pasted:
    images: torch.Tensor  # (N, 3, CANVAS, CANVAS) uint8
    masks: torch.Tensor  # (N, CANVAS, CANVAS) bool: the pasted digit's box
    labels: torch.Tensor  # (N,)


def paste_digits(digits: np.ndarray, labels: np.ndarray, seed: int) -> Pasted:
    """Each 8x8 digit (ink 0..16), upscaled SCALE times, pasted at a random patch-aligned place on random texture."""
    rng = np.random.default_rng(seed)
    side, n = 8 * SCALE, len(digits)
    images = np.empty((n, 3, CANVAS, CANVAS), dtype=np.uint8)
    masks = np.zeros((n, CANVAS, CANVAS), dtype=bool)
    for i, digit in enumerate(digits):
        # Texture: 4 px blocks of random grey plus per-pixel noise, per channel; nothing in it predicts the label.
        blocks = np.kron(rng.uniform(0, 1, (3, CANVAS // 4, CANVAS // 4)), np.ones((1, 4, 4)))
        canvas = 160 * (0.4 * blocks + 0.6 * rng.uniform(0, 1, (3, CANVAS, CANVAS)))
        top, left = rng.integers(0, (CANVAS - side) // PATCH + 1, size=2) * PATCH
        ink = np.kron(digit / 16.0, np.ones((SCALE, SCALE)))  # (8, 8) -> (16, 16)
        window = canvas[:, top : top + side, left : left + side]
        canvas[:, top : top + side, left : left + side] = window * (1 - ink) + 255 * ink  # white ink over texture
        images[i] = canvas.round().clip(0, 255).astype(np.uint8)
        masks[i, top : top + side, left : left + side] = True
    return Pasted(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels).long())


def localisation_config() -> ViTConfig:
    """A 2-block, 64-wide ViT on the 48x48 canvas: 36 patches of 8 px, 10 digit classes."""
    shape = dict(hidden_dim=64, depth=2, num_heads=4, mlp_dim=128)
    return ViTConfig(image_size=CANVAS, patch_size=PATCH, num_classes=10, **shape)


def train(model: ViT, data: Pasted, epochs: int = 12, batch: int = 64, lr: float = 2e-3) -> None:
    generator = torch.Generator().manual_seed(0)
    steps = epochs * (len(data.labels) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.labels), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start : start + batch]
            loss = F.cross_entropy(model(data.images[rows]), data.labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@dataclass
class Localisation:
    trained: ViT
    test: Pasted
    accuracy: float
    summary: dict  # score_heatmaps(...).summary() of the trained model, every measured method
    untrained: dict  # the same for the same architecture before training


@pytest.fixture(scope="module")
def localisation() -> Localisation:
    from sklearn.datasets import load_digits

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the function-scoped one_torch_thread fixture is not set up yet
    try:
        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        train_rows, test_rows = order[:1400], order[1400:]
        train_set = paste_digits(digits.images[train_rows], digits.target[train_rows], seed=1)
        test_set = paste_digits(digits.images[test_rows], digits.target[test_rows], seed=2)
        config = localisation_config()
        torch.manual_seed(0)
        untrained = ViT(config).eval()
        torch.manual_seed(0)
        trained = ViT(config)
        train(trained, train_set)
        with torch.no_grad():
            accuracy = (trained(test_set.images).argmax(-1) == test_set.labels).float().mean().item()
        summary = score_heatmaps(trained, batches(test_set), measured_methods()).summary()
        before_training = score_heatmaps(untrained, batches(test_set), measured_methods()).summary()
    finally:
        torch.set_num_threads(before)
    return Localisation(trained, test_set, accuracy, summary, before_training)


def batches(data: Pasted, size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(data.images[i : i + size], data.masks[i : i + size]) for i in range(0, len(data.labels), size)]


@pytest.mark.learning
def test_heatmaps_of_a_trained_vit_point_at_the_digit(localisation: Localisation) -> None:
    summary, untrained = localisation.summary, localisation.untrained
    print(f"\nlocalisation: {summary['num_images']} held-out digits, top-1 {localisation.accuracy:.3f}")
    print("trained:\n" + format_table(summary))
    print("same ViT, untrained:\n" + format_table(untrained))
    # It learned the digits (chance 0.1), so it had to find them. bench/heatmap_localisation.py, 5 seeds x 3 CPU
    # kernel settings: top-1 0.70-0.89 (this seed ~0.78); every claim below held in each of those runs for this seed.
    assert localisation.accuracy >= 0.6
    baseline = summary["baseline"]
    assert baseline["area_fraction"] == pytest.approx(1 / 9)  # 16x16 on 48x48
    assert baseline["random_cell"] == pytest.approx(1 / 9)  # patch-aligned: exactly 4 of 36 cells
    methods = summary["methods"]
    assert len(methods) == 10
    for name, method in SERVICE_METHODS.items():
        scores = methods[method.key]
        assert scores["pointing"] >= 0.8, (name, scores)  # vs 0.11 by chance
        assert scores["mass"] >= 3 * baseline["area_fraction"], (name, scores)
    # The plain rollout the service used to serve points as well, but spreads its heat: discarding sharpens it.
    default = methods[SERVICE_METHODS[DEFAULT_METHOD].key]
    assert default["mass"] >= methods[PLAIN_ROLLOUT.key]["mass"] + 0.2
    # Training made the difference: the same architecture untrained points no better than chance (its gradient
    # rollout is flat: a fresh ViT's zero head gives every class the same logit, whatever the image).
    assert untrained["methods"][PLAIN_ROLLOUT.key]["pointing"] <= 2 * baseline["random_cell"]
    assert default["pointing"] >= untrained["methods"][SERVICE_METHODS[DEFAULT_METHOD].key]["pointing"] + 0.3


@pytest.mark.learning
def test_the_service_default_is_the_best_measured_method(localisation: Localisation) -> None:
    """Best pointing (within 0.01), and near the best mass. Over 5 seeds x 3 CPU kernel settings
    (bench/heatmap_localisation.py, docs/trust.md) the default's mass trailed the best method's by up to 0.058 (this
    very seed under the AVX2 kernels), so "the best mass within 0.03", asserted here before, did not hold reliably."""
    methods = localisation.summary["methods"]
    default = methods[SERVICE_METHODS[DEFAULT_METHOD].key]
    assert default["pointing"] >= max(m["pointing"] for m in methods.values()) - 0.01
    assert default["mass"] >= max(m["mass"] for m in methods.values()) - 0.1
