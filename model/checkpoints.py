"""What a published checkpoint becomes on its way into petvit, whichever library wrote it.

Each converter (model/hf_convert.py for transformers, model/timm_convert.py for timm) reads a hub-layout folder's
config.json (+ preprocessor_config.json) and the tensors of its model.safetensors, and returns a Converted: our
ViTConfig, our state dict, the labels and the preprocessing its library applies. model/hub_import.py finds the
folder (local or through the Hugging Face hub) and writes the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model.artifact import Preprocessing
from model.config import ViTConfig


class UnsupportedCheckpoint(ValueError):
    """The checkpoint is not one petvit's ViT computes exactly; the message names the difference."""


@dataclass(frozen=True)
class Converted:
    config: ViTConfig
    state_dict: dict[str, torch.Tensor]  # our names (model/vit.py), ready for ViT.from_weights
    labels: list[str]  # class index -> label, as the checkpoint names them
    preprocessing: Preprocessing  # what the library's own processor does to a photo
    library: str  # "transformers" or "timm"
    architecture: str  # e.g. "ViTForImageClassification", "deit_tiny_distilled_patch16_224"
    notes: dict[str, Any] = field(default_factory=dict)  # how anything not 1:1 was represented, for the record


def patch_embed_from_conv(conv: torch.Tensor) -> torch.Tensor:
    """A patch-embedding Conv2d weight (D, C, P, P) -> our linear's (D, P*P*C), in patchify's (p1 p2 c) order."""
    D, C, P, Q = conv.shape
    if P != Q:
        raise UnsupportedCheckpoint(f"non-square {P}x{Q} patches: petvit's ViT cuts square patches")
    return conv.permute(0, 2, 3, 1).reshape(D, P * Q * C)  # (D, C, P, P) -> (D, P, P, C) -> (D, P*P*C)


def square_side(value: Any, what: str) -> int:
    """An int, or a [height, width] pair of equal sides, as an int; anything else is refused."""
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise UnsupportedCheckpoint(f"{what} {value!r} is not square: petvit's ViT and its preprocessing are square")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedCheckpoint(message)
