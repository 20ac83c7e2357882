"""Published-checkpoint stand-ins for the import tests: transformers' and timm's own modules at random init (every
weight drawn wide enough that a mapping mistake shows in the logits), saved by each library's own save function in
the hub layout, and a Hugging Face hub cache laid out by hand as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.labels import BREEDS

# Pet breeds spelt as Hugging Face fine-tunes tend to spell them (the dataset's file prefixes, lower case).
HF_PET_LABELS = [b.file_prefix.lower() for b in BREEDS]


def randomize(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter redrawn around its role's centre (norm gains around 1, the rest around 0), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_gain = param.ndim == 1 and ("norm" in name) and name.endswith("weight")
            param.copy_(noise + 1.0 if is_gain else noise)
    return module.eval()


def photo_pixels(photo: Image.Image, size: int) -> torch.Tensor:
    """The photo squashed to size x size by PIL (bilinear): (1, 3, size, size) uint8, the pixels both sides see."""
    array = np.asarray(photo.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]  # (S, S, 3) -> (1, 3, S, S)


def normalized(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """What a library's processor hands its model: 0..255 -> 0..1, then (x - mean) / std."""
    x = pixels.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def hf_vit(folder: Path, patch_size: int = 16, image_size: int = 64, labels: list[str] | None = None, seed: int = 0):
    """transformers ViTForImageClassification (2 layers, width 64) + ViTImageProcessor, save_pretrained to folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = labels or HF_PET_LABELS
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=image_size,
        patch_size=patch_size, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )  # fmt: skip
    model = randomize(ViTForImageClassification(config), seed)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model


def hf_deit(folder: Path, with_teacher: bool = True, image_size: int = 64, seed: int = 0):
    """transformers DeiTForImageClassification[WithTeacher] (2 layers, width 64), save_pretrained to folder."""
    from transformers import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=image_size,
        patch_size=16, num_labels=37, id2label=dict(enumerate(HF_PET_LABELS)),
    )  # fmt: skip
    cls = DeiTForImageClassificationWithTeacher if with_teacher else DeiTForImageClassification
    model = randomize(cls(config), seed)
    model.save_pretrained(folder)
    return model


def timm_model(folder: Path, architecture: str, seed: int = 0, labels: list[str] | None = None, **kwargs):
    """timm.create_model(architecture, depth=2, 37 classes, **kwargs), save_for_hf (safetensors) to folder."""
    import timm
    from timm.models import save_for_hf

    model = randomize(timm.create_model(architecture, pretrained=False, num_classes=37, depth=2, **kwargs), seed)
    save_for_hf(model, str(folder), model_config={"label_names": labels or HF_PET_LABELS}, safe_serialization=True)
    return model


def fill_hub_cache(hf_home: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The files of `folder` as huggingface_hub caches repo `repo` at `commit` on branch main: blobs named by
    content hash, snapshots/<commit>/<file> linking to them, refs/main naming the commit."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, root / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("../../blobs") / digest)
    return snapshot
