"""`petvit evaluate --heatmaps` on the Pets fixture in torchvision's on-disk layout, trimaps included: the masks
follow the images' geometry, cover the same images as the splits, and end up as numbers in report.json and a PNG."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from cli.main import main
from model.artifact import read_metadata, save_artifact
from model.config import resize_size_for
from model.explain import SERVICE_METHODS, measured_methods
from tests.conftest import make_tiny_model
from tests.training.pets_fixture import make_pets_tree
from training.data import DataConfig, DatasetUnavailable, load_splits, pets_with_masks
from training.heatmaps import EXAMPLE_COUNT, evenly_spaced

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pets_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 trainval + 2 test images per breed, each with its trimap; the pets painted white into the pictures."""
    return make_pets_tree(tmp_path_factory.mktemp("pets"), trainval_per_class=3, test_per_class=2, paint_pets=True)


@pytest.fixture
def pets_artifact(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_artifact(make_tiny_model(), path, {"name": "petvit-tiny-test", "trained": False})
    return path


def white(image: torch.Tensor) -> torch.Tensor:
    """(3, S, S) uint8 -> (S, S) bool: the painted pet (every channel near 255; JPEG blurs its edge a little)."""
    return image.min(dim=0).values >= 200


def test_masks_follow_the_images_resize_and_centre_crop(pets_tree: Path) -> None:
    """40x32 photos: resized to 36 px high and 45 wide, then cropped to the middle 32 columns. The mask must land on
    the painted pet; a mask squeezed to 32x32 without the crop (the mistake this guards against) lands beside it."""
    masked = pets_with_masks(DataConfig(data_dir=str(pets_tree), image_size=32), "test")
    assert len(masked) == 37 * 2
    aligned, squeezed = [], []
    for i in range(0, len(masked), 5):
        image, mask, _ = masked[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert mask.shape == (32, 32) and mask.dtype == torch.bool
        paint = white(image)
        aligned.append((paint & mask).sum().item() / paint.sum().item())  # share of the painted pet in the mask
        trimap = Image.open(masked.base._segs[masked.indices[i]])
        naive = torch.from_numpy(np.array(trimap.resize((32, 32), Image.Resampling.NEAREST))) != 2
        squeezed.append((paint & naive).sum().item() / paint.sum().item())
    assert min(aligned) >= 0.97, aligned
    assert np.mean(squeezed) <= np.mean(aligned) - 0.08, (squeezed, aligned)


def test_masks_cover_the_splits_images_in_order(pets_tree: Path) -> None:
    config = DataConfig(data_dir=str(pets_tree), image_size=32, val_fraction=0.34, split_seed=3)
    splits = load_splits(config)
    for name in ("val", "test"):
        masked, plain = pets_with_masks(config, name), getattr(splits, name)
        assert masked.indices == plain.indices and len(masked) == len(plain)
        assert [masked[i][2] for i in range(len(masked))] == plain.targets()
    with pytest.raises(ValueError, match="held-out"):
        pets_with_masks(config, "train")


def test_missing_trimaps_say_where_to_get_them(pets_tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-trimaps"
    shutil.copytree(pets_tree, copy)
    shutil.rmtree(copy / "oxford-iiit-pet" / "annotations" / "trimaps")
    with pytest.raises(DatasetUnavailable, match=r"annotations\.tar\.gz"):
        pets_with_masks(DataConfig(data_dir=str(copy), image_size=32), "test")


def pet_fraction_by_hand(trimap_path: Path, size: int = 32) -> float:
    """The trimap's pet + boundary share of the centre crop, through torchvision's functional resize and crop."""
    trimap = torch.from_numpy(np.array(Image.open(trimap_path)))[None]  # (1, H, W)
    resized = TF.resize(trimap, resize_size_for(size), interpolation=TF.InterpolationMode.NEAREST)
    crop = TF.center_crop(resized, size)[0]
    return ((crop == 1) | (crop == 3)).float().mean().item()


def test_evaluate_heatmaps_writes_the_numbers_and_the_png(pets_tree: Path, pets_artifact: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate", "--checkpoint", str(pets_artifact), "--data-dir", str(pets_tree), "--output-dir", str(out),
            "--heatmaps", "--heatmap-images", "20", "--dtype", "fp32", "--write-metadata"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "heatmaps on 20 images" in printed and "baseline: area" in printed and "rollout:mean:0.9" in printed
    report = json.loads((out / "report.json").read_text())
    maps = report["heatmaps"]
    assert (maps["num_images"], maps["of_images"], maps["split"], maps["grid"]) == (20, 74, "test", [4, 4])
    assert set(maps["methods"]) == {m.key for m in measured_methods()}
    for scores in maps["methods"].values():
        assert set(scores) == {"pointing", "mass"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert maps["service_methods"] == {name: m.key for name, m in SERVICE_METHODS.items()}
    # The baseline is the pets' area in the crops the model saw, computed here without petvit's code.
    test_list = (pets_tree / "oxford-iiit-pet" / "annotations" / "test.txt").read_text().split("\n")
    picked = [test_list[i].split()[0] for i in evenly_spaced(74, 20)]
    trimaps = pets_tree / "oxford-iiit-pet" / "annotations" / "trimaps"
    by_hand = np.mean([pet_fraction_by_hand(trimaps / f"{name}.png") for name in picked])
    assert maps["baseline"]["area_fraction"] == pytest.approx(by_hand, abs=1e-6)
    assert 0.2 < by_hand < 0.6  # the fixture's ellipses: a real share, not an empty or a full mask
    # The PNG: one row per example, photo + mask + three heatmap columns.
    assert report["files"]["heatmap_examples"] == str(out / "heatmap_examples.png") == maps["file"]
    with Image.open(out / "heatmap_examples.png") as png:
        assert png.format == "PNG" and png.height > png.width * EXAMPLE_COUNT / 5 * 0.8
    # --write-metadata keeps the numbers with the model (shown at /v1/model), not this machine's path.
    stored = read_metadata(pets_artifact).evaluation["heatmaps"]
    assert stored["methods"] == maps["methods"] and "file" not in stored


def test_plain_evaluation_has_no_heatmaps(pets_tree: Path, pets_artifact: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "--checkpoint", str(pets_artifact), "--data-dir", str(pets_tree), "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert "heatmaps" not in report and not (tmp_path / "heatmap_examples.png").exists()


def test_heatmaps_need_pets_masks(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tree"
    for name in ("Bengal", "beagle"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 40), (40 * i, 90, 20)).save(root / name / f"{i}.png")
    artifact = tmp_path / "folder.safetensors"
    data = DataConfig(dataset="folder", data_dir=str(root), image_size=32)
    save_artifact(
        make_tiny_model(num_classes=2), artifact, {"labels": ["Bengal", "Beagle"], "training": {"data": data.to_dict()}}
    )
    argv = ["evaluate", "--checkpoint", str(artifact), "--output-dir", str(tmp_path / "o"), "--heatmaps"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only Oxford-IIIT Pet has" in err and "Traceback" not in err
