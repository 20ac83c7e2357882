"""transformers' DINOv2 backbone (Dinov2Model, save_pretrained's folder) -> our ViT, exactly.

DINOv2 (Oquab et al. 2023) is a self-supervised ViT/14 with LayerScale; Dinov2Model has no classifier: its
pooler_output is the CLS token after the final LayerNorm, the feature DINOv2's linear evaluation reads. The
artifact keeps that feature (forward_head(pre_logits=True)) and a zero 37-breed head, written untrained, for
`petvit train --recipe linear-probe|finetune --init`.

Name map (transformers -> ours), per layer i:
    embeddings.patch_embeddings.projection (D, C, P, P)  -> patch_embed (D, P*P*C), patchify order
    embeddings.cls_token / position_embeddings          -> cls_token / pos_embed (resampled to the input side)
    encoder.layer.i.norm1 / norm2                       -> blocks.i.norm1 / norm2
    ...attention.attention.query, key, value            -> blocks.i.attn.qkv (rows stacked q, k, v)
    ...attention.output.dense                           -> blocks.i.attn.proj
    ...layer_scale1.lambda1 / layer_scale2.lambda1      -> blocks.i.ls1.gamma / ls2.gamma
    ...mlp.fc1 / mlp.fc2                                -> blocks.i.mlp.fc1 / fc2
    layernorm                                           -> norm
    embeddings.mask_token                               -> (dropped: used only in pre-training)

Published DINOv2 learned its position embeddings at 518 px (37 x 37 patches) and its processor crops 224 px; by
default the artifact takes 224 px inputs, its embeddings resampled once exactly as Dinov2Model resamples them for a
224 px input (bicubic, align_corners=False, float32), so the two agree at 224 px; --image-size 518 keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from model.config import ViTConfig
from model.convert.checkpoints import (
    Converted,
    LayerTensors,
    UnsupportedCheckpoint,
    backbone_head,
    import_side,
    patch_embed_from_conv,
    policy_at,
    require,
    resample_for,
    square_side,
)
from model.convert.hf import processor_policy
from model.labels import PET_LABELS

MODEL_TYPES = ("dinov2",)
_LAYER = re.compile(r"^(?:dinov2\.)?encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_LAYER_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def convert_dinov2(
    doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], processor: Mapping[str, Any] | None,
    image_size: int | None = None,
) -> Converted:  # fmt: skip
    """config.json, the tensors and preprocessor_config.json of a Dinov2Model -> Converted (an untrained head)."""
    check_dinov2_config(doc, processor)
    policy = processor_policy(processor or {})
    patch = square_side(doc.get("patch_size", 14), "patch_size")
    D = int(doc["hidden_size"])
    grid = square_side(doc.get("image_size", 518), "image_size") // patch
    side = import_side(grid, patch, policy.image_size, image_size)
    config = ViTConfig(
        image_size=side,
        patch_size=patch,
        in_channels=int(doc.get("num_channels", 3)),
        hidden_dim=D,
        depth=int(doc["num_hidden_layers"]),
        num_heads=int(doc["num_attention_heads"]),
        mlp_dim=int(D * float(doc.get("mlp_ratio", 4))),
        qkv_bias=bool(doc.get("qkv_bias", True)),
        num_classes=len(PET_LABELS),
        mean=policy.mean,
        std=policy.std,
        layer_norm_eps=float(doc.get("layer_norm_eps", 1e-6)),
        layer_scale=True,
    )
    state_dict = {**_state_dict(tensors, config), **backbone_head(config)}
    notes = {"preprocessing_from": "preprocessor_config.json", "feature": "pooler_output (CLS after the final norm)",
             "position_embeddings": f"learned at {grid * patch}px, stored for {side}px"}  # fmt: skip
    return Converted(config, state_dict, list(PET_LABELS), policy_at(policy, side), "transformers", "Dinov2Model",
                     notes, trained=False)  # fmt: skip


def check_dinov2_config(doc: Mapping[str, Any], processor: Mapping[str, Any] | None) -> None:
    architectures = list(doc.get("architectures") or ["Dinov2Model"])
    require(
        architectures == ["Dinov2Model"],
        f"transformers architecture {architectures}: petvit imports the DINOv2 backbone Dinov2Model (a "
        "Dinov2ForImageClassification classifies the CLS token concatenated with the mean patch token, not the CLS "
        "token petvit's heads read)",
    )
    require(not doc.get("use_swiglu_ffn"), "use_swiglu_ffn: DINOv2 ViT-g's SwiGLU MLP is not a part petvit has")
    act = doc.get("hidden_act", "gelu")
    require(act == "gelu", f"hidden_act {act!r}: petvit's ViT has the exact (erf) GELU or quick_gelu")
    require(processor is not None, "no preprocessor_config.json: DINOv2's resize, crop and mean/std are unknown "
            "without it (the hub repos have one; download it with the weights)")  # fmt: skip


def _state_dict(tensors: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """transformers' names -> ours; anything not in the map is refused, never silently dropped."""
    out: dict[str, torch.Tensor] = {}
    layers = LayerTensors(_LAYER, _QKV, _LAYER_NAMES)
    for key, value in tensors.items():
        name = key.removeprefix("dinov2.")
        if name == "embeddings.cls_token":
            out["cls_token"] = value
        elif name == "embeddings.position_embeddings":
            out["pos_embed"] = resample_for(value, 1, config.image_size, config.patch_size)
        elif name == "embeddings.patch_embeddings.projection.weight":
            out["patch_embed.weight"] = patch_embed_from_conv(value)
        elif name == "embeddings.patch_embeddings.projection.bias":
            out["patch_embed.bias"] = value
        elif name in ("layernorm.weight", "layernorm.bias"):
            out[f"norm.{name.split('.')[1]}"] = value
        elif name == "embeddings.mask_token":
            continue  # masked-image modelling only
        elif layers.take(key, value, out):
            continue
        else:
            raise UnsupportedCheckpoint(f"unexpected tensor {key!r} for a Dinov2Model: not a part petvit has")
    out.update(layers.stacked(config))
    return out
