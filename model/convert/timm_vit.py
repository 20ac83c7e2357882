"""timm's ViT and DeiT (save_for_hf's folder: config.json with architecture, model_args and pretrained_cfg) -> ours.

Our parameter names are timm's (model/vit.py), so the map is the identity except the patch embedding:
    patch_embed.proj (D, C, P, P)  -> patch_embed (D, P*P*C), patchify order
    blocks.i.ls1.gamma / ls2.gamma -> the same (LayerScale, ViTConfig.layer_scale: DINOv2, init_values)
timm's VisionTransformer has many options our ViT does not; each is refused by name (from the tensors it adds, or
the model argument that sets it), never guessed at: register tokens, average or attention pooling, norms in other
places, other activations. What the architecture name fixes and the tensors cannot show (the number of heads) comes
from model_args or the name's size word.

A model without a classifier (num_classes=0, as timm publishes DINOv2: vit_small_patch14_dinov2.lvd142m) imports as
a backbone: its feature is the CLS token after the final norm, its 37-breed head zero, written untrained. Its input
side is pretrained_cfg's (518 for DINOv2) unless --image-size asks for another; the position embeddings are then
resampled once as timm's dynamic_img_size resamples them (resample_abs_pos_embed: bicubic with antialias).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from model.artifact import Preprocessing
from model.config import ViTConfig
from model.convert.checkpoints import (
    Converted,
    UnsupportedCheckpoint,
    backbone_head,
    import_side,
    patch_embed_from_conv,
    policy_at,
    require,
    resample_for,
    square_side,
)
from model.labels import PET_LABELS

# Tensors that only a variant petvit does not represent has, and what that variant is.
_REFUSED_TENSORS = (
    (re.compile(r"^reg_token$"), "register tokens (reg_tokens, Darcet et al. 2024)"),
    (re.compile(r"^norm_pre\."), "a LayerNorm before the blocks (pre_norm, as in CLIP)"),
    (re.compile(r"^fc_norm\."), "a LayerNorm on pooled features (fc_norm, used with global-average pooling)"),
    (re.compile(r"^attn_pool\."), "an attention-pooling (MAP) head instead of the class token"),
    (re.compile(r"\.attn\.[qk]_norm\."), "query/key normalisation (qk_norm)"),
    (re.compile(r"\.(attn|mlp)\.norm\."), "extra norms inside attention or the MLP (scale_attn_norm/scale_mlp_norm)"),
    (re.compile(r"\.mlp\.fc1_[gx]\."), "a gated (SwiGLU) MLP"),
    (re.compile(r"^patch_embed\.norm\."), "a LayerNorm after the patch embedding"),
    (re.compile(r"^pre_logits\."), "a representation (pre-logits) layer before the head"),
)  # fmt: skip
# model_args that do not change the function at inference (dropouts, init) or that the tensors already show.
_NEUTRAL_ARGS = {
    "num_classes", "depth", "in_chans", "img_size", "patch_size", "embed_dim", "num_heads", "mlp_ratio", "qkv_bias",
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
    "weight_init", "fix_init", "dynamic_img_size", "dynamic_img_pad", "global_pool", "proj_bias", "init_values",
}  # fmt: skip
# model_args whose value must be petvit's, each with what other values would mean.
_MATCHING_ARGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "class_token": ((True,), "no class token (class_token=False)"),
    "no_embed_class": ((False,), "position embeddings without the class token's row (no_embed_class)"),
    "reg_tokens": ((0, None), "register tokens (reg_tokens)"),
    "pre_norm": ((False,), "a LayerNorm before the blocks (pre_norm)"),
    "fc_norm": ((None, False), "a LayerNorm on pooled features (fc_norm)"),
    "final_norm": ((True,), "no final LayerNorm (final_norm=False)"),
    "init_values": ((None, 0, 0.0), "LayerScale (init_values)"),
    "qk_norm": ((False,), "query/key normalisation (qk_norm)"),
    "act_layer": ((None, "gelu"), "another activation than the exact GELU (act_layer)"),
    "norm_layer": ((None, "layernorm"), "another norm than LayerNorm (norm_layer)"),
    "pos_embed": (("learn",), "no learned position embedding (pos_embed)"),
    "class_token_bias": ((None, False), "class-token bias"),
}
# Heads per the size word of timm's ViT names (vit_tiny_..., deit_small_...), with the width that size has.
_SIZES = {"tiny": (192, 3), "small": (384, 6), "medium": (512, 8), "base": (768, 12), "large": (1024, 16),
          "huge": (1280, 16), "giant": (1408, 16)}  # fmt: skip
_INTERPOLATIONS = ("bilinear", "bicubic")


def is_timm_config(doc: Mapping[str, Any]) -> bool:
    return "architecture" in doc and "pretrained_cfg" in doc


def convert_timm(
    doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], image_size: int | None = None
) -> Converted:
    """config.json and model.safetensors' tensors of a timm ViT/DeiT -> Converted (image_size: --image-size)."""
    architecture = str(doc.get("architecture"))
    args = dict(doc.get("model_args") or {})
    check_timm_model(architecture, args, doc, tensors)
    pretrained = dict(doc.get("pretrained_cfg") or {})
    D = int(tensors["cls_token"].shape[-1])
    conv = tensors["patch_embed.proj.weight"]  # (D, C, P, P)
    distilled = "dist_token" in tensors
    prefix = 2 if distilled else 1
    grid = math.isqrt(int(tensors["pos_embed"].shape[1]) - prefix)
    require(grid * grid + prefix == tensors["pos_embed"].shape[1], "position embeddings are not class token(s) + "
            "a square grid (no_embed_class or a non-square input)")  # fmt: skip
    depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    classifier = "head.weight" in tensors
    preprocessing = _preprocessing(pretrained, grid * int(conv.shape[-1]))
    side = import_side(grid, int(conv.shape[-1]), preprocessing.image_size, image_size)
    config = ViTConfig(
        image_size=side,
        patch_size=int(conv.shape[-1]),
        in_channels=int(conv.shape[1]),
        hidden_dim=D,
        depth=depth,
        num_heads=_num_heads(architecture, args, D),
        mlp_dim=int(tensors["blocks.0.mlp.fc1.weight"].shape[0]),
        qkv_bias="blocks.0.attn.qkv.bias" in tensors,
        num_classes=int(tensors["head.weight"].shape[0]) if classifier else len(PET_LABELS),
        mean=preprocessing.mean,
        std=preprocessing.std,
        layer_norm_eps=1e-6,  # timm's ViT: partial(nn.LayerNorm, eps=1e-6)
        distilled=distilled,
        layer_scale="blocks.0.ls1.gamma" in tensors,
    )
    state_dict = _state_dict(tensors, config)
    if not classifier:
        state_dict |= backbone_head(config)
    labels = _labels(doc, config.num_classes) if classifier else list(PET_LABELS)
    notes = {} if classifier else {"feature": "the CLS token after the final norm (no classifier)"}
    return Converted(config, state_dict, labels, policy_at(preprocessing, side), "timm", architecture, notes,
                     trained=classifier)  # fmt: skip


def check_timm_model(
    architecture: str, args: Mapping[str, Any], doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Refuse, by name, every timm option that would make our ViT compute something else."""
    require(
        architecture.startswith(("vit_", "deit_")) and not re.search(r"clip|siglip|quickgelu", architecture),
        f"timm architecture {architecture!r}: petvit imports timm's vit_* and deit_* ViTs with a class token "
        "(DeiT III, CLIP, SigLIP, EVA, BEiT and the rest have parts petvit's ViT lacks)",
    )
    for pattern, what in _REFUSED_TENSORS:
        found = next((k for k in tensors if pattern.search(k)), None)
        require(found is None, f"{architecture} has {what} (tensor {found}): petvit's ViT has no such part")
    require("cls_token" in tensors, f"{architecture} has no class token (global-average pooling): petvit's ViT "
            "classifies from its class token")  # fmt: skip
    pool = doc.get("global_pool", args.get("global_pool", "token"))
    require(pool == "token", f"{architecture} pools with {pool!r}, not the class token: petvit's heads read the "
            "class token")  # fmt: skip
    for name, value in args.items():
        if name in _NEUTRAL_ARGS:
            continue
        allowed, what = _MATCHING_ARGS.get(name, ((), ""))
        require(bool(what), f"{architecture} was built with model_args {name}={value!r}, which petvit does not know")
        require(value in allowed, f"{architecture} has {what}, {name}={value!r}: petvit's ViT has no such part")
    for name in ("pos_embed", "patch_embed.proj.weight", "norm.weight"):
        require(name in tensors, f"{architecture} lacks {name}: not the ViT layout petvit reads")


def _num_heads(architecture: str, args: Mapping[str, Any], width: int) -> int:
    """Heads are invisible in the tensors: model_args says, or the size word of the name does (at its width)."""
    if "num_heads" in args:
        return int(args["num_heads"])
    size = architecture.split("_")[1] if "_" in architecture else ""
    if size in _SIZES and _SIZES[size][0] == width:
        return _SIZES[size][1]
    raise UnsupportedCheckpoint(
        f"{architecture}: its width {width} and name do not tell the number of attention heads, and model_args "
        "has no num_heads; save it with save_for_hf(model, ..., model_args={'num_heads': N})"
    )


def _labels(doc: Mapping[str, Any], num_classes: int) -> list[str]:
    names = doc.get("label_names") or doc.get("pretrained_cfg", {}).get("label_names")
    if isinstance(names, Mapping):
        names = [names.get(str(i), names.get(i)) for i in range(num_classes)]
    if not names:
        return [f"class_{i}" for i in range(num_classes)]
    require(len(names) == num_classes, f"label_names lists {len(names)} labels for a {num_classes}-class head")
    return [str(name) if name is not None else f"class_{i}" for i, name in enumerate(names)]


def _state_dict(tensors: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key == "patch_embed.proj.weight":
            out["patch_embed.weight"] = patch_embed_from_conv(value)
        elif key == "pos_embed":  # timm's dynamic_img_size rule when the artifact's side is not the learned one
            out[key] = resample_for(value, config.num_prefix_tokens, config.image_size, config.patch_size, True)
        elif key == "patch_embed.proj.bias":
            out["patch_embed.bias"] = value
        else:
            out[key] = value
    out.setdefault("patch_embed.bias", torch.zeros(config.hidden_dim))  # a bias-free conv: a zero bias, exactly
    for i in range(config.depth):
        out.setdefault(f"blocks.{i}.attn.proj.bias", torch.zeros(config.hidden_dim))  # proj_bias=False, likewise
    return out


def _preprocessing(pretrained: Mapping[str, Any], native: int) -> Preprocessing:
    """timm's eval transform: resize to floor(size / crop_pct) (shorter side for crop_mode "center", both sides
    for "squash"), centre-crop size, normalise with mean/std."""
    input_size = pretrained.get("input_size") or [3, native, native]
    side = square_side(list(input_size[1:]), "input_size")
    require(side == native, f"pretrained_cfg's input_size {side} is not the model's {native}")
    crop_pct = float(pretrained.get("crop_pct") or 0.875)
    crop_mode = str(pretrained.get("crop_mode") or "center")
    require(crop_mode in ("center", "squash"), f"crop_mode {crop_mode!r}: petvit resizes by shorter side or squash")
    interpolation = str(pretrained.get("interpolation") or "bicubic")
    require(interpolation in _INTERPOLATIONS, f"interpolation {interpolation!r}: petvit has {_INTERPOLATIONS}")
    return Preprocessing(
        image_size=side,
        resize_size=math.floor(side / crop_pct),  # timm's transforms_imagenet_eval
        interpolation=interpolation,
        mean=tuple(float(v) for v in pretrained.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(float(v) for v in pretrained.get("std") or (0.229, 0.224, 0.225)),
        resize_mode="shorter_side" if crop_mode == "center" else "squash",
    )
