"""Distillation teachers (DeiT, Touvron et al. 2021): torchvision convnets in petvit's artifact container, and one
loader for whatever a student distils from.

A convnet teacher artifact is the same container as a ViT artifact (safetensors, petvit's JSON document in the
header, never a pickle): the weights are torchvision's own state dict of the network, and the document says what
rebuilds it, `"architecture": {"kind": "torchvision", "name": "resnet18", "num_classes": 37}`, beside the usual
labels, preprocessing, training and evaluation records. load_artifact (the service, predict, evaluate) refuses
such a file with a message; load_teacher takes either kind.

    teacher = load_teacher("artifacts/teacher-resnet50.safetensors", device="cuda")
    logits = teacher.module(images)  # (B, 3, H, W) uint8 or float 0..1 -> (B, classes), eval mode, no grad
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from model.artifact import (
    ARCHITECTURE_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    ArtifactError,
    ArtifactNotFoundError,
    Preprocessing,
    check_format,
    default_labels,
    file_sha256,
    load_artifact,
    read_metadata_document,
    save_file_atomically,
)
from model.config import IMAGENET_MEAN, IMAGENET_STD, resize_size_for
from model.convert.pretrained import fetch_state_dict
from model.labels import species_of

CONVNET_KIND = "torchvision"
# torchvision classification models that are not convnets with one logits output: the transformers want their
# own input size (use a petvit ViT artifact as a ViT teacher), and googlenet / inception_v3 return auxiliary
# logits while training and transform their input only when built with weights.
_EXCLUDED_PREFIXES = ("vit_", "swin_", "maxvit", "googlenet", "inception")


def convnet_names() -> list[str]:
    """The torchvision classification convnets a teacher can be (resnet18, resnet50, regnet_y_400mf, ...)."""
    import torchvision
    from torchvision.models import list_models

    return [name for name in list_models(module=torchvision.models) if not name.startswith(_EXCLUDED_PREFIXES)]


def check_convnet_name(arch: str) -> str:
    if arch not in convnet_names():
        raise ValueError(f"unknown convnet {arch!r}; torchvision's classification convnets are {convnet_names()}")
    return arch


class ConvNet(nn.Module):
    """A torchvision classification convnet taking petvit's inputs: RGB uint8 0..255 or float 0..1, normalised
    inside with mean/std as ViT.normalize does, so one batch feeds a ViT student and its convnet teacher alike.

    `net` is the torchvision model itself; its state dict is what a teacher artifact stores.
    """

    mean: torch.Tensor  # (1, C, 1, 1) buffers registered in __init__, declared here for the type checker
    std: torch.Tensor

    def __init__(
        self,
        arch: str,
        net: nn.Module,
        num_classes: int,
        image_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.arch, self.net, self.num_classes, self.image_size = arch, net, num_classes, image_size
        self.mean_std = (tuple(mean), tuple(std))
        shape = (1, len(mean), 1, 1)  # (C,) -> (1, C, 1, 1): broadcast over (B, C, H, W)
        # Not persistent: the artifact's preprocessing carries the values, the weights file stays torchvision's.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (255.0 * self.std).reciprocal() if x.dtype == torch.uint8 else self.std.reciprocal()  # (1, C, 1, 1)
        x = torch.addcmul(-self.mean / self.std, x.float(), scale)  # (B, C, H, W) normalised, float32
        logits: torch.Tensor = self.net(x.to(next(self.net.parameters()).dtype))  # (B, classes)
        return logits


def build_convnet(arch: str, num_classes: int, init: str = "random", image_size: int = 224) -> ConvNet:
    """torchvision.models.<arch>(num_classes=...), random or with ImageNet weights under a fresh head.

    init "imagenet" reads torchvision's DEFAULT weights through its weights API (hub cache or download); offline
    it raises PretrainedWeightsUnavailable naming the file and the folder to put it in.
    """
    from torchvision.models import get_model, get_model_weights

    check_convnet_name(arch)
    net = get_model(arch, num_classes=num_classes)
    if init == "imagenet":
        entry = get_model_weights(arch).DEFAULT
        fetch_state_dict(entry)  # into the hub cache, or the clear offline message
        # torchvision's own builder loads the cached file (it knows each family's key renames, e.g. densenet's).
        _adopt_backbone(net, get_model(arch, weights=entry), arch)
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'imagenet', got {init!r}")
    return ConvNet(arch, net, num_classes, image_size)


def _adopt_backbone(net: nn.Module, pretrained: nn.Module, arch: str) -> None:
    """Copy every pretrained tensor of matching shape into `net`; only the 1000-way classifier may be left out."""
    ours, theirs = net.state_dict(), pretrained.state_dict()
    left_out = {k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape}
    if len({k.rsplit(".", 1)[0] for k in left_out}) > 1:
        raise ValueError(f"{arch}'s ImageNet weights do not fit it beyond its classifier: {sorted(left_out)}")
    net.load_state_dict({k: theirs[k] for k in ours if k not in left_out}, strict=False)


# ---------------------------------------------------------------------------------------------- the artifact
def convnet_document(model: ConvNet, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document of a convnet teacher artifact: the architecture, then labels, preprocessing and the
    records (`fields`: name, trained, labels, species, training, evaluation, provenance)."""
    doc = dict(fields)
    labels, species = default_labels(model.num_classes)
    if "labels" in doc:
        labels = [str(label) for label in doc.pop("labels")]
        species = [species_of(label) for label in labels]
    species = list(doc.pop("species", species))
    if len(labels) != model.num_classes or len(species) != model.num_classes:
        raise ValueError(f"the head has {model.num_classes} classes but {len(labels)} labels were given")
    mean, std = model.mean_std
    preprocessing = Preprocessing(model.image_size, resize_size_for(model.image_size), "bilinear", mean, std)
    provenance = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        ARCHITECTURE_KEY: {"kind": CONVNET_KIND, "name": model.arch, "num_classes": model.num_classes},
        "name": str(doc.pop("name", f"teacher-{model.arch}")),
        "trained": bool(doc.pop("trained", False)),
        "labels": labels,
        "species": species,
        "preprocessing": preprocessing.to_dict(),
        "training": dict(doc.pop("training", None) or {}),
        "evaluation": dict(doc.pop("evaluation", None) or {}),
        "provenance": {**provenance, **dict(doc.pop("provenance", None) or {})},
    }


def save_convnet_artifact(model: ConvNet, path: str | os.PathLike[str], fields: Mapping[str, Any]) -> Path:
    """Write a convnet teacher: torchvision's state dict of model.net + the JSON document, atomically."""
    doc = convnet_document(model, fields)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.net.state_dict().items()}
    return save_file_atomically(tensors, path, metadata={METADATA_KEY: json.dumps(doc)})


def load_convnet_artifact(path: str | os.PathLike[str]) -> tuple[ConvNet, dict[str, Any]]:
    """Rebuild torchvision.models.<name>(num_classes=...) and load its weights; returns (model in eval mode, the
    JSON document). ArtifactError says what is wrong with a file that is not a convnet teacher."""
    path = Path(path)
    doc = read_metadata_document(path)
    check_format(doc, str(path))
    architecture = doc.get(ARCHITECTURE_KEY)
    if not isinstance(architecture, Mapping) or architecture.get("kind") != CONVNET_KIND:
        raise ArtifactError(f"{path} is not a convnet teacher artifact (architecture {architecture!r})")
    try:
        from torchvision.models import get_model

        arch, num_classes = check_convnet_name(str(architecture["name"])), int(architecture["num_classes"])
        net = get_model(arch, num_classes=num_classes)
        net.load_state_dict(load_file(path, device="cpu"))
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{path}: the convnet teacher does not load: {first}") from None
    preprocessing = doc.get("preprocessing") or {}
    model = ConvNet(
        arch,
        net,
        num_classes,
        int(preprocessing.get("image_size") or 224),
        tuple(preprocessing.get("mean") or IMAGENET_MEAN),
        tuple(preprocessing.get("std") or IMAGENET_STD),
    )
    return model.eval(), doc


# ---------------------------------------------------------------------------------------------- any teacher
@dataclass(frozen=True)
class Teacher:
    """What a student distils from, loaded: the frozen network and what the student's artifact records of it."""

    module: nn.Module  # eval mode, no gradients: (B, 3, H, W) uint8 or float 0..1 -> logits (B, classes)
    arch: str  # "vit-b16", "vit-ti16 (distilled)", "resnet50", ...
    labels: list[str]
    path: str
    sha256: str
    test_top1: float | None  # the teacher's own test-split top-1, when its artifact was evaluated

    def identity(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "arch": self.arch, "test_top1": self.test_top1}


def load_teacher(path: str | os.PathLike[str], device: str | torch.device | None = None) -> Teacher:
    """A petvit ViT artifact or a convnet teacher artifact, frozen (eval mode, requires_grad off) on `device`."""
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFoundError(
            f"no teacher artifact at {path}; train one with `petvit train --recipe teacher --arch resnet50 --out "
            f"{path}` (a torchvision convnet) or `petvit train --recipe finetune --out {path}` (a ViT)"
        )
    architecture = read_metadata_document(path).get(ARCHITECTURE_KEY)
    module: nn.Module
    if isinstance(architecture, Mapping) and architecture.get("kind") == CONVNET_KIND:
        convnet, doc = load_convnet_artifact(path)
        module, arch, labels, evaluation = convnet, convnet.arch, list(doc["labels"]), doc.get("evaluation") or {}
    else:
        vit, meta = load_artifact(path)
        distilled = " (distilled)" if vit.config.distilled else ""
        arch, labels, evaluation = f"vit-{meta.variant or 'custom'}{distilled}", list(meta.labels), meta.evaluation
        module = vit
    module.requires_grad_(False)
    if device is not None:
        module = module.to(device)
    top1 = evaluation.get("top1")
    return Teacher(module.eval(), arch, labels, str(path), file_sha256(path), None if top1 is None else float(top1))
