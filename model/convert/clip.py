"""transformers' CLIP image tower (CLIPModel, CLIPVisionModel[WithProjection]; save_pretrained's folder) -> our ViT.

CLIP (Radford et al. 2021) encodes images with a ViT that differs from the plain one in three switches
(ViTConfig): a LayerNorm before the blocks (pre_layrnorm -> norm_pre), quick_gelu, and a bias-free projection of
the normalised CLS token into the image-text space (visual_projection -> feature_proj). Its patch embedding has no
bias (ours is stored as zeros, exactly).

Name map (transformers -> ours), with {v} = "vision_model.", per layer i:
    {v}embeddings.patch_embedding (D, C, P, P)    -> patch_embed.weight (D, P*P*C), patchify order; bias 0
    {v}embeddings.class_embedding (D,)            -> cls_token (1, 1, D)
    {v}embeddings.position_embedding.weight (T, D) -> pos_embed (1, T, D)
    {v}pre_layrnorm / post_layernorm              -> norm_pre / norm
    {v}encoder.layers.i.layer_norm1 / layer_norm2 -> blocks.i.norm1 / norm2
    ...self_attn.q_proj, k_proj, v_proj           -> blocks.i.attn.qkv (rows stacked q, k, v)
    ...self_attn.out_proj                         -> blocks.i.attn.proj
    ...mlp.fc1 / mlp.fc2                          -> blocks.i.mlp.fc1 / fc2
    visual_projection (E, D)                      -> feature_proj
    text_model.*, text_projection, logit_scale    -> (the text tower: read by model/convert/zero_shot.py, not stored)

Without --zero-shot the tower is a backbone: its feature (forward_head(pre_logits=True)) is transformers'
image_embeds (get_image_features: projected, not normalised) and its 37-breed head is zero, written untrained.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from model.config import ACTIVATIONS, ViTConfig
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
)
from model.convert.hf import processor_policy
from model.labels import PET_LABELS

MODEL_TYPES = ("clip", "clip_vision_model")
ARCHITECTURES = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
_V = "vision_model."
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_NAMES = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_DIRECT = {
    f"{_V}pre_layrnorm.weight": "norm_pre.weight",
    f"{_V}pre_layrnorm.bias": "norm_pre.bias",
    f"{_V}post_layernorm.weight": "norm.weight",
    f"{_V}post_layernorm.bias": "norm.bias",
    "visual_projection.weight": "feature_proj.weight",
}


def vision_config(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The vision tower's settings: CLIPModel nests them under vision_config, a CLIPVisionModel has them on top."""
    return (doc.get("vision_config") or {}) if doc.get("model_type") == "clip" else doc


def convert_clip(
    doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], processor: Mapping[str, Any] | None,
    image_size: int | None = None,
) -> Converted:  # fmt: skip
    """config.json, the tensors and preprocessor_config.json of a CLIP model -> Converted (the image tower, with a
    zero head; model/convert/zero_shot.py gives it the text tower's head)."""
    architecture = check_clip_config(doc, processor)
    vision = vision_config(doc)
    policy = processor_policy(processor or {})
    conv = tensors[f"{_V}embeddings.patch_embedding.weight"]  # (D, C, P, P)
    patch, D = int(conv.shape[-1]), int(conv.shape[0])
    grid = int(vision.get("image_size", 224)) // patch
    side = import_side(grid, patch, policy.image_size, image_size)
    projection = tensors.get("visual_projection.weight")
    config = ViTConfig(
        image_size=side,
        patch_size=patch,
        in_channels=int(conv.shape[1]),
        hidden_dim=D,
        depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        num_classes=len(PET_LABELS),
        mean=policy.mean,
        std=policy.std,
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        pre_norm=True,
        activation=str(vision.get("hidden_act", "quick_gelu")),
        projection_dim=int(projection.shape[0]) if projection is not None else 0,
    )
    state_dict = {**_state_dict(tensors, config, grid), **backbone_head(config)}
    feature = "image_embeds (get_image_features)" if projection is not None else "pooler_output"
    notes = {"preprocessing_from": "preprocessor_config.json", "feature": feature}
    return Converted(config, state_dict, list(PET_LABELS), policy_at(policy, side), "transformers", architecture,
                     notes, trained=False)  # fmt: skip


def check_clip_config(doc: Mapping[str, Any], processor: Mapping[str, Any] | None) -> str:
    architectures = list(doc.get("architectures") or [])
    require(
        len(architectures) == 1 and architectures[0] in ARCHITECTURES,
        f"transformers architecture {architectures}: petvit imports CLIP as {', '.join(ARCHITECTURES)}",
    )
    act = vision_config(doc).get("hidden_act", "quick_gelu")
    require(act in ACTIVATIONS, f"hidden_act {act!r}: petvit's ViT has {' or '.join(ACTIVATIONS)}")
    require(processor is not None, "no preprocessor_config.json: CLIP's resize, crop and mean/std are unknown "
            "without it (the hub repos have one; download it with the weights)")  # fmt: skip
    return str(architectures[0])


def _state_dict(tensors: Mapping[str, torch.Tensor], config: ViTConfig, grid: int) -> dict[str, torch.Tensor]:
    """transformers' vision-tower names -> ours; the text tower is left to model/convert/zero_shot.py; anything
    else in the vision tower that is not in the map is refused, never silently dropped."""
    D = config.hidden_dim
    out: dict[str, torch.Tensor] = {"patch_embed.bias": torch.zeros(D)}  # CLIP's patch conv has no bias
    layers = LayerTensors(_LAYER, _QKV, _LAYER_NAMES)
    for key, value in tensors.items():
        if key.startswith(("text_model.", "text_projection.")) or key == "logit_scale":
            continue
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key == f"{_V}embeddings.patch_embedding.weight":
            out["patch_embed.weight"] = patch_embed_from_conv(value)
        elif key == f"{_V}embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, D)  # (D,) -> (1, 1, D)
        elif key == f"{_V}embeddings.position_embedding.weight":
            require(value.shape[0] == 1 + grid * grid, "position embeddings are not the class token + a square grid")
            out["pos_embed"] = resample_for(value[None], 1, config.image_size, config.patch_size)  # (T, D) -> (1, T, D)
        elif layers.take(key, value, out):
            continue
        else:
            raise UnsupportedCheckpoint(f"unexpected tensor {key!r} for a CLIP image tower: not a part petvit has")
    out.update(layers.stacked(config))
    return out
