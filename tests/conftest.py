"""Fixtures shared by every test folder: tiny models and artifacts, a real photo, and a small ViT trained on real
handwritten digits (for tests that hold a lower precision to float32's answers).

Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.artifact import save_artifact
from model.config import ViTConfig
from model.vit import ViT
from training.open_set import Outputs, fit_trust


def make_tiny_config(**overrides) -> ViTConfig:
    """A 2-block, 32-wide ViT on 32x32 images (4x4 patches of 8 px): milliseconds per forward on a CPU."""
    base = dict(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=37)
    return ViTConfig(**{**base, **overrides})


def make_tiny_model(seed: int = 0, **overrides) -> ViT:
    """A tiny ViT with random weights everywhere, the head included (the default init zeroes the head, which
    would make every prediction a tie)."""
    torch.manual_seed(seed)
    model = ViT(make_tiny_config(**overrides))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    return model.eval()


@pytest.fixture
def tiny_config() -> ViTConfig:
    return make_tiny_config()


@pytest.fixture
def tiny_model() -> ViT:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny 37-class artifact (random weights, marked untrained). Treat it as read-only."""
    path = tmp_path_factory.mktemp("artifacts") / "tiny.safetensors"
    save_artifact(
        make_tiny_model(),
        path,
        {"name": "petvit-tiny-test", "variant": "tiny", "trained": False, "evaluation": {"top1": 0.5}},
    )
    return path


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    """scikit-image's chelsea: a real 451x300 photo of a cat that ships offline."""
    from skimage import data

    return Image.fromarray(np.asarray(data.chelsea()))


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as (N, 3, 16, 16) uint8 images and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy((digits.images * 255 / 16).astype(np.uint8))  # 0..16 ink levels -> 0..255, (N, 8, 8)
    # (N, 8, 8) -> (N, 1, 16, 16), each pixel a 2x2 block -> (N, 3, 16, 16) grey RGB
    images = F.interpolate(pixels[:, None].float(), scale_factor=2, mode="nearest").to(torch.uint8)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target)


def train_digits_model(epochs: int = 40, seed: int = 0) -> tuple[ViT, torch.Tensor, torch.Tensor]:
    """A 2-block ViT (16x16 images, 4x4 patches of 4 px) trained in-process on 80 % of the digits, with the held-out
    20 % (360 images, uint8, and their labels). About 15-25 s on the 2-core development CPU; ~94 % held-out top-1."""
    threads = torch.get_num_threads()
    # One intra-op thread: on a shared CPU, a second OpenMP thread spins at every barrier of these tiny matmuls
    # waiting for a descheduled peer (measured: 248 s with two threads on a busy 2-core box, against ~15 s).
    torch.set_num_threads(1)
    try:
        return _train_digits(epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_digits(epochs: int, seed: int) -> tuple[ViT, torch.Tensor, torch.Tensor]:
    images, labels = digits_images()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    held_out, train = order[:360], order[360:]
    model = fit_digits_vit(images[train], labels[train], 10, epochs, seed, generator)
    return model, images[held_out], labels[held_out]


def fit_digits_vit(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, seed: int, generator: torch.Generator
) -> ViT:
    """The digits ViT (16x16 images, 4x4 patches of 4 px, 2 blocks, width 64) trained on these images, in eval mode."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_dim=64, depth=2, num_heads=4, mlp_dim=128, num_classes=num_classes
    )
    model = ViT(config).train()
    steps_per_epoch = -(-len(labels) // 64)  # ceil
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_model() -> tuple[ViT, torch.Tensor, torch.Tensor]:
    """(float32 ViT trained on real digits, held-out images (360, 3, 16, 16) uint8, their labels (360,)), trained
    once per session. Read-only: copy.deepcopy the model before casting, quantising or compiling it."""
    return train_digits_model()


@dataclass
class OpenSetDigits:
    """A digits ViT that knows only 0-4, its artifact (temperature and open set fitted as `petvit train` fits them),
    and held-out images: in-distribution (unseen 0-4) and out-of-distribution (every 5-9)."""

    artifact: Path
    model: ViT
    fields: dict  # {"calibration": Calibration, "open_set": OpenSet}, as training/open_set.py fit_trust returns
    val: Outputs  # held-out 0-4 the temperature and the thresholds were fitted on
    test: Outputs  # held-out 0-4: never trained on, never used to fit anything
    unseen: Outputs  # the digits 5-9
    test_images: torch.Tensor  # (180, 3, 16, 16) uint8
    unseen_images: torch.Tensor  # (896, 3, 16, 16) uint8


OPEN_SET_SEED = 4  # one fixed seed; bench/open_set_digits.py reports seeds 0-4 (docs/trust.md)


def train_open_set_digits(folder: Path, seed: int = OPEN_SET_SEED, epochs: int = 120) -> OpenSetDigits:
    """Digits 0-4 split 541 train / 180 validation / 180 test, the ViT trained on train (~15 s on one thread), then
    calibration and open set fitted (train: class Gaussians; validation: temperature and thresholds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see train_digits_model
    try:
        images, labels = digits_images()
        generator = torch.Generator().manual_seed(seed)
        known, unseen = (labels < 5).nonzero().squeeze(1), (labels >= 5).nonzero().squeeze(1)
        known = known[torch.randperm(len(known), generator=generator)]
        test, val, train = known[:180], known[180:360], known[360:]
        model = fit_digits_vit(images[train], labels[train], 5, epochs, seed, generator)
        with torch.no_grad():
            train_out, val_out, test_out, unseen_out = (
                Outputs(*model.forward_with_features(images[i]), labels[i]) for i in (train, val, test, unseen)
            )
    finally:
        torch.set_num_threads(threads)
    fields = fit_trust(train_out, val_out, num_classes=5)
    artifact = folder / "digits-0-4.safetensors"
    preprocessing = {"image_size": 16, "resize_size": 16}  # uploads of 16x16 digits reach the model unchanged
    save_artifact(model, artifact, {"name": "digits-0-4", "trained": True, "labels": [str(d) for d in range(5)],
                                    "preprocessing": preprocessing, **fields})  # fmt: skip
    return OpenSetDigits(artifact, model, fields, val_out, test_out, unseen_out, images[test], images[unseen])


@pytest.fixture(scope="session")
def open_set_digits(tmp_path_factory: pytest.TempPathFactory) -> OpenSetDigits:
    """Trained once per session; read-only."""
    return train_open_set_digits(tmp_path_factory.mktemp("open-set"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A gpu test that runs (-m gpu) on a machine without CUDA must fail, not pass or skip quietly.
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA device (-m gpu selects it; run it on the GPU machine)")
