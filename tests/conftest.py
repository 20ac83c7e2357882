"""Fixtures shared by every test folder: tiny models and artifacts, and a real photo.

Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.artifact import save_artifact
from model.config import ViTConfig
from model.vit import ViT


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


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A gpu test that runs (-m gpu) on a machine without CUDA must fail, not pass or skip quietly.
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA device (-m gpu selects it; run it on the GPU machine)")
