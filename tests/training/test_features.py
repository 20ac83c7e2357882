"""model/features.py: the linear probe's feature cache is reused only when nothing that shapes the features changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import make_tiny_model
from training.data import DataConfig, eval_transform, load_splits
from training.features import cached_features


@pytest.fixture
def view(tmp_path: Path):
    root = tmp_path / "tree"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (100 * c, 30 * i, 50)).save(root / name / f"{i}.png")
    splits = load_splits(DataConfig(dataset="folder", data_dir=str(root), val_fraction=0.0, test_fraction=0.0))
    return splits.train.with_transform(eval_transform(32))


def features(cache: Path, model, view, **kwargs) -> tuple[torch.Tensor, bool]:
    feats, _, hit = cached_features(cache, "train", model, view, {"image_size": 32}, batch_size=4, **kwargs)
    return feats, hit


def test_same_inputs_hit_the_cache(view, tmp_path: Path) -> None:
    model = make_tiny_model()
    first, hit = features(tmp_path / "c", model, view)
    again, hit_again = features(tmp_path / "c", model, view)
    assert not hit and hit_again and torch.equal(first, again)


def test_normalisation_change_without_weight_change_misses(view, tmp_path: Path) -> None:
    model = make_tiny_model()
    features(tmp_path / "c", model, view)
    other = make_tiny_model(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # same seed: the same weights
    assert torch.equal(other.patch_embed.weight, model.patch_embed.weight)
    feats, hit = features(tmp_path / "c", other, view)
    assert not hit  # was: a hit, serving features computed with the other mean/std
    torch.testing.assert_close(feats, features(tmp_path / "fresh", other, view)[0])


def test_image_replaced_under_the_same_name_misses(view, tmp_path: Path) -> None:
    model = make_tiny_model()
    features(tmp_path / "c", model, view)
    path = Path(view.base.samples[view.indices[0]][0])
    stat = path.stat()
    Image.new("RGB", (48, 40), (255, 0, 0)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not features(tmp_path / "c", model, view)[1]


def test_autocast_dtype_is_part_of_the_key(view, tmp_path: Path) -> None:
    model = make_tiny_model()
    features(tmp_path / "c", model, view)
    assert not features(tmp_path / "c", model, view, autocast_dtype=torch.bfloat16)[1]
