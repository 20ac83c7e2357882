"""What a published checkpoint becomes on its way into petvit, whichever library wrote it.

Each converter (model/convert/hf.py for transformers, model/convert/timm_vit.py for timm) reads a hub-layout folder's
config.json (+ preprocessor_config.json) and the tensors of its model.safetensors, and returns a Converted: our
ViTConfig, our state dict, the labels and the preprocessing its library applies. model/convert/hub.py finds the
folder (local or through the Hugging Face hub) and writes the artifact.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from model.artifact import Preprocessing
from model.config import ViTConfig
from model.vit import resample_position_embedding


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
    trained: bool = True  # False for a backbone without a classifier (DINOv2, a CLIP tower): its head is zero


@dataclass
class LayerTensors:
    """Per-layer tensors of a transformers encoder, matched by `pattern` as (layer, part, param): parts in `qkv_names`
    are collected for stack_qkv, parts in `names` written under ours (blocks.i.<ours>.<param>)."""

    pattern: re.Pattern[str]
    qkv_names: tuple[str, str, str]
    names: Mapping[str, str]
    qkv: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)

    def take(self, key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
        """Map one tensor into `out` (or the q/k/v collection); False when it is not a per-layer part we have."""
        m = self.pattern.match(key)
        if m is None or m.group(2) not in (*self.qkv_names, *self.names):
            return False
        layer, part, param = m.groups()
        if part in self.qkv_names:
            self.qkv[(layer, part, param)] = value
        else:  # DINOv2 calls LayerScale's vector lambda1, timm and we call it gamma
            out[f"blocks.{layer}.{self.names[part]}.{'gamma' if param == 'lambda1' else param}"] = value
        return True

    def stacked(self, config: ViTConfig) -> dict[str, torch.Tensor]:
        return stack_qkv(self.qkv, self.qkv_names, config)


def stack_qkv(
    parts: Mapping[tuple[str, str, str], torch.Tensor], names: tuple[str, str, str], config: ViTConfig
) -> dict[str, torch.Tensor]:
    """Separate query/key/value projections, keyed (layer, name, weight/bias), -> our fused blocks.i.attn.qkv."""
    out: dict[str, torch.Tensor] = {}
    params = ("weight", "bias") if config.qkv_bias else ("weight",)
    for layer in range(config.depth):
        for param in params:
            keys = [(str(layer), name, param) for name in names]
            require(all(key in parts for key in keys), f"layer {layer} lacks its query/key/value {param}")
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(
                [parts[key] for key in keys], dim=0
            )  # 3 x (D, ...) -> (3D, ...): q, k, v
    return out


def import_side(grid_side: int, patch_size: int, crop: int | None, requested: int | None) -> int:
    """The input side the artifact takes: --image-size when given, else the processor's crop, else the side the
    position embeddings were learned for. It must be a whole number of patches."""
    side = requested or crop or grid_side * patch_size
    require(side % patch_size == 0, f"an input side of {side}px is not a whole number of {patch_size}px patches")
    return side


def resample_for(
    pos_embed: torch.Tensor, prefix: int, side: int, patch_size: int, antialias: bool = False
) -> torch.Tensor:
    """Position embeddings stored for the artifact's input side: resampled once, with the source library's rule
    (model/vit.py resample_position_embedding), when that side is not the one they were learned for."""
    grid = side // patch_size
    if pos_embed.shape[1] == prefix + grid * grid:
        return pos_embed
    return resample_position_embedding(pos_embed, prefix, (grid, grid), antialias=antialias)


def backbone_head(config: ViTConfig) -> dict[str, torch.Tensor]:
    """A zero head over petvit's 37 breeds for a checkpoint published without a classifier: the artifact is written
    untrained (its predictions mean nothing) and starts `petvit train --recipe linear-probe|finetune --init`."""
    return {
        "head.weight": torch.zeros(config.num_classes, config.feature_dim),
        "head.bias": torch.zeros(config.num_classes),
    }


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


def policy_at(policy: Preprocessing, side: int) -> Preprocessing:
    """The processor's policy for another input side: the crop becomes `side`, the resize keeps its ratio to it."""
    if side == policy.image_size:
        return policy
    resize = round(side * policy.resize_size / policy.image_size)
    return dataclasses.replace(policy, image_size=side, resize_size=resize)
