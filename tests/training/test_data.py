"""training/data.py: Pets through torchvision's own OxfordIIITPet, folder splits, transforms, the offline message."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import OxfordIIITPet

from model.labels import BREEDS, PET_LABELS, PET_SPECIES
from tests.training.pets_fixture import make_pets_tree
from training.data import (
    DataConfig,
    DatasetUnavailable,
    Deterministic,
    batch_mixer,
    eval_transform,
    load_splits,
    pets_dataset,
    stratified_split,
    train_transform,
)


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pets_tree(tmp_path_factory.mktemp("pets"), trainval_per_class=4, test_per_class=2)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 20 small PNGs each, in ImageFolder layout."""
    root = tmp_path_factory.mktemp("folder")
    for c, name in enumerate(("Bengal", "beagle", "zebra")):
        (root / name).mkdir()
        for i in range(20):
            Image.new("RGB", (12, 10), (80 * c, i * 10, 0)).save(root / name / f"{i}.png")
    return root


def test_fixture_reads_through_torchvision_oxford_iiit_pet(pets_root: Path) -> None:
    trainval = OxfordIIITPet(str(pets_root), split="trainval")
    test = OxfordIIITPet(str(pets_root), split="test")
    assert len(trainval) == 37 * 4 and len(test) == 37 * 2
    assert tuple(trainval.classes) == PET_LABELS  # torchvision derives the class order from the files
    image, target = trainval[5]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert target == 1  # rows are written breed by breed, 4 per breed: item 5 is the second breed
    binary = OxfordIIITPet(str(pets_root), split="test", target_types="binary-category")
    assert [binary[i][1] for i in range(0, len(binary), 2)] == [0 if s == "cat" else 1 for s in PET_SPECIES]


def test_fixture_list_txt_matches_the_real_format(pets_root: Path) -> None:
    lines = (pets_root / "oxford-iiit-pet" / "annotations" / "list.txt").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert len(header) == 6 and header[0].startswith("#Image CLASS-ID SPECIES BREED ID")
    assert len(rows) == 37 * 6
    cats = {r[0].rsplit("_", 1)[0] for r in rows if r[2] == "1"}
    assert cats == {b.file_prefix for b in BREEDS if b.species == "cat"}
    assert max(int(r[3]) for r in rows if r[2] == "1") == 12 and max(int(r[3]) for r in rows if r[2] == "2") == 25


def test_pets_splits_hold_out_validation_from_trainval_and_keep_test(pets_root: Path) -> None:
    splits = load_splits(DataConfig(dataset="pets", data_dir=str(pets_root), val_fraction=0.25, download=False))
    train_idx, val_idx = set(splits.train.indices), set(splits.val.indices)
    assert not train_idx & val_idx
    assert len(train_idx | val_idx) == 37 * 4 and len(splits.test) == 37 * 2
    assert sorted(set(splits.val.targets())) == list(range(37))  # stratified: every breed validated
    assert splits.labels == list(PET_LABELS) and splits.species == list(PET_SPECIES)
    again = load_splits(DataConfig(dataset="pets", data_dir=str(pets_root), val_fraction=0.25, download=False))
    assert again.val.indices == splits.val.indices


def test_pets_accepts_the_oxford_iiit_pet_folder_itself(pets_root: Path) -> None:
    dataset = pets_dataset(pets_root / "oxford-iiit-pet", "test", download=False)
    assert len(dataset) == 37 * 2


def test_missing_pets_offline_names_both_archives_and_where(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.oxford_iiit_pet as tv_pets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_pets, "download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailable) as caught:
        pets_dataset(tmp_path / "nowhere", "trainval", download=True)
    message = str(caught.value)
    assert "images.tar.gz" in message and "annotations.tar.gz" in message
    assert str(tmp_path / "nowhere" / "oxford-iiit-pet") in message
    assert "download failed" in message


def test_folder_split_is_seeded_stratified_and_disjoint(folder_root: Path) -> None:
    config = DataConfig(dataset="folder", data_dir=str(folder_root), val_fraction=0.1, test_fraction=0.2)
    splits = load_splits(config)
    parts = [set(splits.train.indices), set(splits.val.indices), set(splits.test.indices)]
    assert sum(len(p) for p in parts) == 60 and len(parts[0] | parts[1] | parts[2]) == 60
    assert sorted(splits.test.targets()) == [0] * 4 + [1] * 4 + [2] * 4
    assert splits.labels == ["Bengal", "Beagle", "zebra"]  # breed folders get the breed's label
    assert splits.species == ["cat", "dog", "unknown"]
    assert load_splits(config).test.indices == splits.test.indices
    other = load_splits(DataConfig(dataset="folder", data_dir=str(folder_root), split_seed=1))
    assert other.test.indices != splits.test.indices


def test_stratified_split_gives_every_class_a_held_out_item() -> None:
    rest, held = stratified_split([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0.1], seed=3)
    assert sorted(held) and {0, 1} == {0 if i < 3 else 1 for i in held}
    assert sorted(rest + held) == list(range(13))


def test_missing_folder_raises_dataset_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="one sub-folder per class"):
        load_splits(DataConfig(dataset="folder", data_dir=str(tmp_path / "absent")))


def test_eval_transform_resizes_crops_and_does_not_normalise() -> None:
    image = Image.fromarray(np.full((60, 90, 3), (200, 10, 30), np.uint8))
    out = eval_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[:, 16, 16].tolist() == [200, 10, 30]  # raw pixel values: the model normalises itself
    as_float = eval_transform(32, dtype=torch.float32)(image)
    assert as_float.dtype == torch.float32
    torch.testing.assert_close(as_float, out.float() / 255)


def test_train_transform_is_random_but_seeded() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    transform = train_transform(24, augment="trivial")
    torch.manual_seed(0)
    first = [transform(image) for _ in range(3)]
    torch.manual_seed(0)
    second = [transform(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])
    assert first[0].shape == (3, 24, 24) and first[0].dtype == torch.uint8
    assert train_transform(24, augment="randaugment")(image).shape == (3, 24, 24)


def test_train_transform_without_flip_keeps_orientation() -> None:
    left_bright = np.zeros((32, 32, 3), np.uint8)
    left_bright[:, :16] = 255
    transform = train_transform(32, augment="light", hflip=False, min_crop_scale=1.0)
    for _ in range(10):
        out = transform(Image.fromarray(left_bright))
        assert out[:, :, :8].float().mean() > out[:, :, -8:].float().mean()


def test_unknown_augmentation_is_rejected() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transform(32, augment="autoaugment")


def test_mixup_cutmix_produce_soft_targets_over_the_classes() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    mixed, targets = batch_mixer(5)(images, torch.arange(8) % 5)
    assert mixed.dtype == torch.float32 and mixed.shape == (8, 3, 16, 16) and float(mixed.max()) <= 1.0
    assert targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))


@pytest.fixture()
def noisy_folder(tmp_path: Path) -> Path:
    """Two classes of 6 random-noise PNGs of different sizes: any change in decoding or resampling shows."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, (20 + i, 17 + 2 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    return tmp_path


def test_cached_images_give_the_same_items_as_decoding_each_time(noisy_folder: Path) -> None:
    config = DataConfig(dataset="folder", data_dir=str(noisy_folder), val_fraction=0.2, test_fraction=0.2)
    plain, cached = load_splits(config), load_splits(DataConfig(**{**config.to_dict(), "cache_images": True}))
    assert cached.train.indices == plain.train.indices and cached.labels == plain.labels
    assert cached.test.targets() == plain.test.targets()
    for split in ("train", "test"):
        view = eval_transform(16)
        for (a, ta), (b, tb) in zip(getattr(plain, split).with_transform(view),
                                    getattr(cached, split).with_transform(view), strict=True):  # fmt: skip
            assert ta == tb and torch.equal(a, b)
    augment = train_transform(16, "trivial")
    torch.manual_seed(5)
    randomised = [image for image, _ in plain.train.with_transform(augment)]
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, (b, _) in zip(randomised, cached.train.with_transform(augment), strict=True))


def test_cached_images_are_decoded_once_and_evaluation_views_computed_once(noisy_folder: Path) -> None:
    config = DataConfig(dataset="folder", data_dir=str(noisy_folder), val_fraction=0.2, test_fraction=0.2)
    splits = load_splits(DataConfig(**{**config.to_dict(), "cache_images": True}))
    expected = [image for image, _ in splits.test.with_transform(eval_transform(16))]
    for png in noisy_folder.rglob("*.png"):
        png.unlink()  # decoded up front: nothing reads the files again
    calls = []

    def counted(image: Image.Image) -> torch.Tensor:
        calls.append(image)
        return eval_transform(16)(image)

    for _ in range(3):  # a new view with the same key each time, as every evaluation builds its own
        view = splits.test.with_transform(Deterministic([counted], key=("counted", 16)))
        assert all(torch.equal(a, b) for a, (b, _) in zip(expected, view, strict=True))
    assert len(calls) == len(splits.test)  # the first view computed each image's output; the others reused them
    random_view = splits.train.with_transform(train_transform(16, "light"))
    assert len(list(random_view)) == len(splits.train)  # a random transform still runs on the kept images
    assert isinstance(eval_transform(16), Deterministic) and eval_transform(16).key == eval_transform(16).key
    assert eval_transform(16).key != eval_transform(20).key
