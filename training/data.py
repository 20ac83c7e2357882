"""Datasets and transforms for training and evaluation: Oxford-IIIT Pet and any ImageFolder tree.

Every split is a list of (image, class index) pairs over one underlying dataset that returns PIL images; the
transform is attached per split, so train and held-out views of the same files never share augmentation.
Transforms end in uint8 (or float 0..1) tensors *without* mean/std normalisation: the ViT normalises itself
(ViT.normalize), so normalising here would apply it twice.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.artifact import Preprocessing
from model.config import resize_size_for
from model.labels import BREEDS, PET_LABELS, PET_SPECIES, species_of

if TYPE_CHECKING:  # torchvision.datasets is imported where a dataset is built
    from torchvision.datasets import OxfordIIITPet

PETS_FOLDER = "oxford-iiit-pet"  # torchvision's OxfordIIITPet looks for <root>/oxford-iiit-pet/{images,annotations}
PETS_ARCHIVES = (
    "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
    "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
)
AUGMENTATIONS = ("none", "light", "trivial", "randaugment")


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and could not be downloaded; the message says what to put where."""


@dataclass(frozen=True)
class DataConfig:
    """On what to train. A field with "help" metadata is a `petvit train` flag (cli/flags.py builds it)."""

    dataset: str = field(
        default="pets",
        metadata={
            "help": "pets: Oxford-IIIT Pet (torchvision's layout); folder: an ImageFolder tree, one folder per class",
            "choices": ("pets", "folder"),
        },
    )
    data_dir: str = field(default="data", metadata={"help": "pets: the folder holding oxford-iiit-pet/"})
    image_size: int = 224
    hflip: bool = field(  # pets are left-right symmetric; digits or text are not
        default=True, metadata={"help": "random horizontal flips in training", "negatable": True}
    )
    min_crop_scale: float = field(
        default=0.08,
        metadata={"help": "RandomResizedCrop's lower bound on the crop's area fraction (0.08: the ImageNet/DeiT one)"},
    )
    # Held-out fractions. Pets keeps its official test split and carves validation out of trainval, so the
    # best epoch is chosen without ever looking at test; a folder tree is split three ways the same way.
    val_fraction: float = field(
        default=0.1, metadata={"help": "fraction held out for validation (picks the best epoch, fits calibration)"}
    )
    test_fraction: float = field(default=0.2, metadata={"help": "folder datasets only"})
    split_seed: int = field(  # the split is a property of the data, kept fixed across training seeds
        default=0, metadata={"help": "seed of the held-out split (keep fixed)"}
    )
    download: bool = field(default=True, metadata={"help": "never try to download Pets", "flag": "--no-download"})
    # Decoding dominates an epoch of small images (70,000 28x28 PNGs: PIL's open and convert took more time than a
    # 64-wide ViT's forward and backward on them), so a data set that fits in memory is decoded once.
    cache_images: bool = field(
        default=False,
        metadata={
            "help": "decode every image once, up front, and keep it in memory (with the evaluation views' tensors): "
            "for data sets that fit in RAM (70,000 28x28 photos: ~0.4 GB; Oxford-IIIT Pet at full size: ~4 GB)"
        },
    )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DataSplits:
    """Train / validation / test views plus the class names, in class-index order."""

    train: TransformedSubset
    val: TransformedSubset
    test: TransformedSubset
    labels: list[str]
    species: list[str]
    sizes: dict[str, int] = field(default_factory=dict)  # images per split, for logs and the artifact's record


# ---------------------------------------------------------------------------------------------- transforms
def _to_output(dtype: torch.dtype) -> list[v2.Transform]:
    # ToImage gives a uint8 tv_tensors.Image; ToDtype with scale=True maps 0..255 -> 0..1 for float output.
    steps: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)]
    if dtype != torch.uint8:
        steps.append(v2.ToDtype(dtype, scale=True))
    return steps


_INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def eval_transform(
    image_size: int, dtype: torch.dtype = torch.uint8, policy: Preprocessing | None = None
) -> v2.Compose:
    """Resize the shorter side to 256/224 of the crop, centre-crop: deterministic, no normalisation.

    policy: an artifact's preprocessing instead (an imported checkpoint's, e.g. Hugging Face's squash to the input
    size): its resize mode, size and interpolation, as the service applies them (model/preprocess.py)."""
    if policy is None:
        resize = v2.Resize(resize_size_for(image_size), antialias=True)
    else:
        side = max(policy.resize_size, image_size)  # as the service: never smaller than the crop
        size = [side, side] if policy.resize_mode == "squash" else side
        resize = v2.Resize(size, interpolation=_INTERPOLATION[policy.interpolation], antialias=True)
    return Deterministic(
        [v2.ToImage(), resize, v2.CenterCrop(image_size), *_to_output(dtype)], key=("eval", image_size, dtype, policy)
    )


class Deterministic(v2.Compose):
    """A Compose whose output depends on its input alone, named by `key`: an ImageCache computes it once per image,
    and two instances with equal keys (each view builds its own) share those outputs."""

    def __init__(self, transforms: Sequence[Callable], key: tuple) -> None:
        super().__init__(list(transforms))
        self.key = key


def train_transform(
    image_size: int,
    augment: str = "trivial",
    hflip: bool = True,
    min_crop_scale: float = 0.08,
    dtype: torch.dtype = torch.uint8,
    policy: Preprocessing | None = None,
) -> v2.Compose:
    """Random crop + flip, then the chosen photometric/geometric policy; no normalisation.

    none: the eval transform (useful to check a loop learns at all); light: crop + flip;
    trivial: + TrivialAugmentWide (parameter-free, strong); randaugment: + RandAugment(2, 9) (DeiT-style).
    policy: an artifact's preprocessing (see eval_transform): its interpolation for the random crop, its
    deterministic view for augment="none".
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if augment == "none":
        return eval_transform(image_size, dtype, policy)  # deterministic: an ImageCache keeps its outputs
    # The policies work on uint8 images, so they run before any conversion to float.
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            image_size,
            scale=(min_crop_scale, 1.0),
            interpolation=_INTERPOLATION[policy.interpolation if policy else "bilinear"],
            antialias=True,
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=9))
    return v2.Compose([*steps, *_to_output(dtype)])


def batch_mixer(num_classes: int, alpha: float = 0.8) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """MixUp or CutMix (chosen per batch) on a float batch; labels become soft (B, num_classes) targets."""
    mix = v2.RandomChoice([v2.MixUp(alpha=alpha, num_classes=num_classes), v2.CutMix(num_classes=num_classes)])

    def apply(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0  # mixing blends pixels; the model accepts float 0..1 as well
        return mix(images, targets)

    return apply


# ---------------------------------------------------------------------------------------------- views
class TransformedSubset(Dataset):
    """The items `indices` of `base` (which yields (PIL image, target)), each passed through `transform`."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable | None = None) -> None:
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if isinstance(self.base, ImageCache):
            return self.base.transformed(self.indices[i], self.transform)
        image, target = self.base[self.indices[i]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)

    def targets(self) -> list[int]:
        """Class index of every item, read from the base dataset's lists (no image is decoded)."""
        labels = _base_targets(self.base)
        return [labels[i] for i in self.indices]

    def with_transform(self, transform: Callable | None) -> TransformedSubset:
        return TransformedSubset(self.base, self.indices, transform)


class ImageCache(Dataset):
    """`base`'s (PIL image, target) items, decoded once up front and kept; a Deterministic transform's output is
    kept too, per image and transform key, the first time a view asks for it. Random transforms still run on every
    call, on the kept image: the same pixels as without the cache, so training and its figures do not change.

    DataLoader workers forked after the decode share its images (copy on write); the transformed outputs they add
    stay in their own process.
    """

    def __init__(self, base: Dataset, desc: str = "decoding") -> None:
        from tqdm import tqdm

        self.base = base
        self.targets = _base_targets(base)  # read without decoding, like the base's own lists
        self.images = [self._load(i) for i in tqdm(range(len(self.targets)), desc=desc, unit="img", mininterval=2.0)]
        self._outputs: dict[tuple, dict[int, Any]] = {}

    def _load(self, index: int) -> Any:
        image, _ = self.base[index]
        if hasattr(image, "load"):
            image.load()  # PIL opens lazily: read the pixels now and let go of the file
        return image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.images[index], self.targets[index]

    def transformed(self, index: int, transform: Callable | None) -> tuple[Any, int]:
        """(transform(image), target) for the item `index`; computed once per Deterministic key."""
        image, target = self.images[index], int(self.targets[index])
        if transform is None:
            return image, target
        if not isinstance(transform, Deterministic):
            return transform(image), target
        outputs = self._outputs.setdefault(transform.key, {})
        if index not in outputs:
            outputs[index] = transform(image)
        return outputs[index], target


def _base_targets(base: Dataset) -> list[int]:
    if hasattr(base, "targets"):  # ImageFolder, ImageCache
        return list(base.targets)
    if hasattr(base, "_labels"):  # OxfordIIITPet keeps its class ids here
        return list(base._labels)
    raise TypeError(f"cannot read targets of {type(base).__name__} without decoding images")


def stratified_split(targets: Sequence[int], fractions: Sequence[float], seed: int) -> tuple[list[int], ...]:
    """Split indices into len(fractions) + 1 parts, each class split in the same proportions, seeded.

    Returns (rest, part_1, ..., part_k): part_i gets round(fraction_i * n_class) items of every class (at least
    one when a class has enough items), `rest` keeps what is left. Same seed, same targets -> same split.
    """
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for cls in sorted(by_class):
        members = by_class[cls]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        start = 0
        for k, fraction in enumerate(fractions, start=1):
            take = round(fraction * len(members)) if fraction > 0 else 0
            if fraction > 0 and take == 0 and len(members) - start > 1:
                take = 1  # every class appears in every held-out split when it can
            parts[k].extend(shuffled[start : start + take])
            start += take
        parts[0].extend(shuffled[start:])
    return tuple(sorted(p) for p in parts)


# ---------------------------------------------------------------------------------------------- Oxford-IIIT Pet
def pets_root(data_dir: str | Path) -> Path:
    """The folder to hand torchvision as `root`: accepts the root itself or the oxford-iiit-pet folder in it."""
    data_dir = Path(data_dir)
    if data_dir.name == PETS_FOLDER and (data_dir / "images").is_dir():
        return data_dir.parent
    return data_dir


def pets_missing_message(data_dir: str | Path, reason: str = "") -> str:
    base = pets_root(data_dir) / PETS_FOLDER
    because = f" ({reason})" if reason else ""
    return (
        f"Oxford-IIIT Pet is not in {base} and could not be downloaded{because}.\n"
        f"On a machine with network access download the two archives\n"
        f"    {PETS_ARCHIVES[0]}\n"
        f"    {PETS_ARCHIVES[1]}\n"
        f"and extract both into {base}/ so that it holds images/*.jpg and annotations/trainval.txt, "
        f"annotations/test.txt:\n"
        f"    mkdir -p {base} && tar -xzf images.tar.gz -C {base} && tar -xzf annotations.tar.gz -C {base}"
    )


def pets_dataset(
    data_dir: str | Path, split: str, download: bool = True, target_types: str | Sequence[str] = "category"
) -> OxfordIIITPet:
    """torchvision's OxfordIIITPet (category targets by default, PIL images), or DatasetUnavailable with what to do."""
    from torchvision.datasets import OxfordIIITPet

    root = pets_root(data_dir)
    anns = root / PETS_FOLDER / "annotations"
    has_files = (root / PETS_FOLDER / "images").is_dir() and (anns / f"{split}.txt").is_file()
    try:
        # Only ask torchvision to download when the files are missing: it re-verifies nothing otherwise anyway.
        return OxfordIIITPet(str(root), split=split, target_types=target_types, download=download and not has_files)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        raise DatasetUnavailable(pets_missing_message(data_dir, f"download failed: {err}")) from None
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetUnavailable(pets_missing_message(data_dir, str(err))) from None


def _pets_train_val(trainval: Dataset, config: DataConfig) -> tuple[list[int], list[int]]:
    """trainval's indices, split into train and the seeded, stratified validation slice."""
    train_idx, val_idx = stratified_split(_base_targets(trainval), [config.val_fraction], config.split_seed)
    return train_idx, val_idx


def load_pets(config: DataConfig) -> DataSplits:
    """Official trainval (minus a seeded, stratified validation slice) and test splits of Oxford-IIIT Pet."""
    trainval = pets_dataset(config.data_dir, "trainval", config.download)
    test = pets_dataset(config.data_dir, "test", download=False)
    if config.cache_images:
        trainval, test = ImageCache(trainval, "decoding trainval"), ImageCache(test, "decoding test")
    train_idx, val_idx = _pets_train_val(trainval, config)
    return DataSplits(
        train=TransformedSubset(trainval, train_idx),
        val=TransformedSubset(trainval, val_idx),
        test=TransformedSubset(test, range(len(test))),
        labels=list(PET_LABELS),
        species=list(PET_SPECIES),
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test)},
    )


# Oxford-IIIT Pet's trimaps: 1 = pet, 2 = background, 3 = the boundary between them (annotations/trimaps/*.png).
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BOUNDARY = 1, 2, 3


class PetsWithMasks(Dataset):
    """Pets images with their pet masks, both through one geometric transform: (image, mask (S, S) bool, label).

    The mask is the trimap's pet and boundary pixels (the boundary is the pet's outline, drawn by the annotators
    on the fur's edge). It travels with the image as a tv_tensors.Mask, so the eval transform resizes and crops it
    with the image's own geometry (nearest neighbour for a mask) and leaves its values alone.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.base = base  # OxfordIIITPet with target_types ["category", "segmentation"]
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, (label, trimap) = self.base[self.indices[i]]
        trimap = tv_tensors.Mask(torch.from_numpy(np.array(trimap, dtype=np.uint8)))  # (H, W) values 1, 2, 3
        image, trimap = self.transform(image, trimap)
        pet = (trimap == TRIMAP_PET) | (trimap == TRIMAP_BOUNDARY)
        return image.as_subclass(torch.Tensor), pet.as_subclass(torch.Tensor), int(label)

    def subset(self, positions: Sequence[int]) -> PetsWithMasks:
        """The items at these positions of this view (e.g. an evenly spaced sample)."""
        return PetsWithMasks(self.base, [self.indices[p] for p in positions], self.transform)


def pets_with_masks(config: DataConfig, split: str) -> PetsWithMasks:
    """The same images as load_pets(config)'s `split` ("test" or "val"), in the same order, with their pet masks
    through the eval transform at config.image_size. DatasetUnavailable when the trimaps are not there."""
    if split not in ("test", "val"):
        raise ValueError(f"masks are read for the held-out splits 'test' and 'val', got {split!r}")
    trimaps = pets_root(config.data_dir) / PETS_FOLDER / "annotations" / "trimaps"
    if not trimaps.is_dir():
        raise DatasetUnavailable(
            f"no trimaps in {trimaps}: heatmap evaluation needs Oxford-IIIT Pet's pet masks, which annotations.tar.gz "
            f"holds ({PETS_ARCHIVES[1]}); extract it into {trimaps.parent.parent}/"
        )
    targets = ["category", "segmentation"]
    transform = eval_transform(config.image_size)
    if split == "test":
        test = pets_dataset(config.data_dir, "test", download=False, target_types=targets)
        return PetsWithMasks(test, range(len(test)), transform)
    trainval = pets_dataset(config.data_dir, "trainval", download=False, target_types=targets)
    return PetsWithMasks(trainval, _pets_train_val(trainval, config)[1], transform)


# ---------------------------------------------------------------------------------------------- ImageFolder
def folder_label(name: str) -> str:
    """A class folder's display label: Pet breed folders ('Bengal', 'great_pyrenees') get the breed's label."""
    for breed in BREEDS:
        if name.lower() in (breed.file_prefix.lower(), breed.label.lower()):
            return breed.label
    return name


def load_folder(config: DataConfig) -> DataSplits:
    """An ImageFolder tree (<dir>/<class>/<image>), split train/val/test per class with a fixed seed."""
    from torchvision.datasets import ImageFolder

    root = Path(config.data_dir)
    if not root.is_dir():
        raise DatasetUnavailable(
            f"no image folder at {root}; expected one sub-folder per class holding its images, "
            f"e.g. {root}/Bengal/1.jpg, {root}/beagle/7.jpg"
        )
    try:
        tree = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetUnavailable(f"{root} is not a usable ImageFolder tree: {err}") from None
    labels = [folder_label(c) for c in tree.classes]
    if config.cache_images:
        tree = ImageCache(tree, f"decoding {root.name}")
    train_idx, val_idx, test_idx = stratified_split(
        tree.targets, [config.val_fraction, config.test_fraction], config.split_seed
    )
    return DataSplits(
        train=TransformedSubset(tree, train_idx),
        val=TransformedSubset(tree, val_idx),
        test=TransformedSubset(tree, test_idx),
        labels=labels,
        species=[species_of(label) for label in labels],
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
    )


def load_splits(config: DataConfig) -> DataSplits:
    """The three splits for `config.dataset`, without transforms (attach them with with_transform)."""
    if config.dataset == "pets":
        return load_pets(config)
    if config.dataset == "folder":
        return load_folder(config)
    raise ValueError(f"dataset must be 'pets' or 'folder', got {config.dataset!r}")
