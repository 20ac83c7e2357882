"""transformers' ViT and DeiT image classifiers (save_pretrained's folder) -> our ViT, exactly.

Name map (transformers -> ours), with {p} = "vit." or "deit.", per layer i:
    {p}embeddings.patch_embeddings.projection (D, C, P, P)   -> patch_embed (D, P*P*C), patchify order
    {p}embeddings.cls_token / distillation_token            -> cls_token / dist_token
    {p}embeddings.position_embeddings                       -> pos_embed
    {p}encoder.layer.i.layernorm_before / layernorm_after   -> blocks.i.norm1 / norm2
    ...attention.attention.query, key, value                -> blocks.i.attn.qkv (rows stacked q, k, v)
    ...attention.output.dense                               -> blocks.i.attn.proj
    ...intermediate.dense / output.dense                    -> blocks.i.mlp.fc1 / fc2
    {p}layernorm                                            -> norm
    classifier (ViT, DeiT)                                  -> head
    cls_classifier / distillation_classifier (WithTeacher)  -> head / head_dist

Differences from petvit's defaults that the config carries: layer_norm_eps (transformers writes 1e-12, torchvision
1e-6) and mean/std (ViTImageProcessor's 0.5). DeiTForImageClassification keeps the distillation token in the
sequence but classifies from CLS alone; our distilled ViT averages two heads, so it is stored as head = 2 * its
classifier and head_dist = 0, whose average is the classifier's answer to the last bit (scaling by two is exact).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from model.artifact import Preprocessing
from model.config import ViTConfig
from model.convert.checkpoints import (
    Converted,
    LayerTensors,
    UnsupportedCheckpoint,
    patch_embed_from_conv,
    require,
    square_side,
)

ARCHITECTURES = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
_LAYER = re.compile(r"^(?:vit|deit)\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# Families close to a ViT that petvit refuses, and why (docs/models.md says the same).
_SIGLIP = (
    "SigLIP's image tower has no class token: a separate attention-pooling head (a learned probe query attending "
    "over the last layer's patch tokens, then an MLP) makes its embedding, while petvit's heads, open set and "
    "attention-rollout heatmaps read the class token"
)
REFUSED_TYPES = {
    "siglip": _SIGLIP,
    "siglip2": _SIGLIP,
    "siglip_vision_model": _SIGLIP,
    "siglip2_vision_model": _SIGLIP,
    "dinov2_with_registers": "DINOv2 with register tokens (Darcet et al. 2024): petvit imports DINOv2 without "
    "registers (Dinov2Model)",
}
# PIL's resample codes, as preprocessor_config.json stores them; the ones petvit's resizers implement.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def processor_defaults(model_type: str, image_size: int) -> dict[str, Any]:
    """What transformers' processor class does when preprocessor_config.json is absent, at the model's input size:
    ViTImageProcessor squashes to the input size; DeiTImageProcessor squashes to 256/224 of it, then crops."""
    if model_type == "vit":
        size = {"height": image_size, "width": image_size}
        return {"size": size, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    resize = round(image_size * 256 / 224)
    return {
        "size": {"height": resize, "width": resize},
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }


def is_transformers_config(doc: Mapping[str, Any]) -> bool:
    return "model_type" in doc or "architectures" in doc


def convert_transformers(
    doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], processor: Mapping[str, Any] | None
) -> Converted:
    """config.json, model.safetensors' tensors and preprocessor_config.json (None when absent) -> Converted."""
    architecture = check_transformers_config(doc)
    model_type = str(doc["model_type"])
    distilled = model_type == "deit"
    config = ViTConfig(
        image_size=square_side(doc.get("image_size", 224), "image_size"),
        patch_size=square_side(doc.get("patch_size", 16), "patch_size"),
        in_channels=int(doc.get("num_channels", 3)),
        hidden_dim=int(doc["hidden_size"]),
        depth=int(doc["num_hidden_layers"]),
        num_heads=int(doc["num_attention_heads"]),
        mlp_dim=int(doc["intermediate_size"]),
        dropout=float(doc.get("hidden_dropout_prob", 0.0)),
        attention_dropout=float(doc.get("attention_probs_dropout_prob", 0.0)),
        qkv_bias=bool(doc.get("qkv_bias", True)),
        num_classes=_num_classes(tensors),
        layer_norm_eps=float(doc.get("layer_norm_eps", 1e-12)),
        distilled=distilled,
    )
    preprocessing, source = _preprocessing(processor, model_type, config)
    config = config.replace(mean=preprocessing.mean, std=preprocessing.std)
    state_dict = _state_dict(tensors, config, architecture)
    notes: dict[str, Any] = {"preprocessing_from": source}
    if architecture == "DeiTForImageClassification":
        notes["head"] = "CLS-only classifier stored as head = 2 x classifier, head_dist = 0 (their average is exact)"
    return Converted(config, state_dict, _labels(doc, config.num_classes), preprocessing, "transformers",
                     architecture, notes)  # fmt: skip


def check_transformers_config(doc: Mapping[str, Any]) -> str:
    """The supported architecture the config names; UnsupportedCheckpoint names what differs otherwise."""
    model_type = doc.get("model_type")
    architectures = list(doc.get("architectures") or [])
    require(
        model_type not in REFUSED_TYPES, f"transformers model_type {model_type!r}: {REFUSED_TYPES.get(str(model_type))}"
    )
    require(
        model_type in ("vit", "deit"),
        f"transformers model_type {model_type!r}: petvit imports ViT and DeiT ({', '.join(ARCHITECTURES)}), CLIP "
        "(CLIPModel, CLIPVisionModel[WithProjection]) and DINOv2 (Dinov2Model)",
    )
    require(
        len(architectures) == 1 and architectures[0] in ARCHITECTURES,
        f"transformers architecture {architectures}: petvit imports image classifiers {', '.join(ARCHITECTURES)} "
        "(a bare ViTModel has no classifier to serve; masked-image-modelling heads classify nothing)",
    )
    act = doc.get("hidden_act", "gelu")
    require(act == "gelu", f"hidden_act {act!r}: petvit's ViT uses the exact (erf) GELU, transformers' 'gelu'")
    return str(architectures[0])


def _num_classes(tensors: Mapping[str, torch.Tensor]) -> int:
    for name in ("classifier.weight", "cls_classifier.weight"):
        if name in tensors:
            return int(tensors[name].shape[0])
    raise UnsupportedCheckpoint("the checkpoint has no classifier (num_labels 0?): petvit serves classifiers")


def _labels(doc: Mapping[str, Any], num_classes: int) -> list[str]:
    id2label = {int(k): str(v) for k, v in (doc.get("id2label") or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(num_classes)]


def _state_dict(tensors: Mapping[str, torch.Tensor], config: ViTConfig, architecture: str) -> dict[str, torch.Tensor]:
    """transformers' names -> ours; anything not in the map is refused, never silently dropped."""
    prefix = "deit." if config.distilled else "vit."
    direct = {
        f"{prefix}embeddings.cls_token": "cls_token",
        f"{prefix}embeddings.distillation_token": "dist_token",
        f"{prefix}embeddings.position_embeddings": "pos_embed",
        f"{prefix}embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
        f"{prefix}layernorm.weight": "norm.weight",
        f"{prefix}layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
        "cls_classifier.weight": "head.weight",
        "cls_classifier.bias": "head.bias",
        "distillation_classifier.weight": "head_dist.weight",
        "distillation_classifier.bias": "head_dist.bias",
    }
    out: dict[str, torch.Tensor] = {}
    layers = LayerTensors(_LAYER, _QKV, _LAYER_NAMES)
    for key, value in tensors.items():
        if key in direct:
            out[direct[key]] = value
        elif key == f"{prefix}embeddings.patch_embeddings.projection.weight":
            out["patch_embed.weight"] = patch_embed_from_conv(value)
        elif key.startswith((f"{prefix}pooler.", f"{prefix}embeddings.mask_token")):
            continue  # unused by the classifier: the pooler feeds no head, the mask token only pre-training
        elif layers.take(key, value, out):
            continue
        else:
            raise UnsupportedCheckpoint(f"unexpected tensor {key!r} for a {architecture}: not a part petvit has")
    out.update(layers.stacked(config))
    if architecture == "DeiTForImageClassification":
        out["head.weight"], out["head.bias"] = 2 * out["head.weight"], 2 * out["head.bias"]
        out["head_dist.weight"] = torch.zeros_like(out["head.weight"])
        out["head_dist.bias"] = torch.zeros_like(out["head.bias"])
    return out


def _size_dict(value: Any) -> dict[str, int]:
    """A processor's size as a dict: older feature extractors (ViTFeatureExtractor) wrote a bare int, which
    transformers reads as a square (get_size_dict's default_to_square)."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    require(isinstance(value, dict), f"the processor's size {value!r} is neither a number nor a dict")
    return {str(k): int(v) for k, v in value.items()}


def _preprocessing(
    processor: Mapping[str, Any] | None, model_type: str, config: ViTConfig
) -> tuple[Preprocessing, str]:
    """preprocessor_config.json (or the processor class's defaults) -> our policy, and where it came from."""
    source = "preprocessor_config.json" if processor is not None else f"{model_type} processor defaults"
    policy = processor_policy(processor_defaults(model_type, config.image_size) if processor is None else processor)
    side = policy.image_size
    require(side == config.image_size, f"the processor makes {side}px inputs, the model takes {config.image_size}px")
    return policy, source


def processor_policy(doc: Mapping[str, Any]) -> Preprocessing:
    """A transformers image processor's settings -> our policy.

    ViTImageProcessor resizes both sides to size (no crop); DeiTImageProcessor resizes both sides to size, then
    centre-crops crop_size: both are the squash policy. A shortest_edge size keeps the aspect ratio (CLIP's and
    DINOv2's processors: shorter side, then the centre crop)."""
    require(doc.get("do_rescale", True), "the processor does not rescale 0..255 to 0..1 (do_rescale false)")
    require(abs(float(doc.get("rescale_factor", 1 / 255)) - 1 / 255) < 1e-9, "the processor rescales by another factor")
    require(doc.get("do_resize", True), "the processor does not resize (do_resize false): petvit always does")
    resample = int(doc.get("resample", 2))
    require(resample in _RESAMPLE, f"the processor resamples with PIL filter {resample}; petvit has bilinear/bicubic")
    size, crop = _size_dict(doc.get("size")), _size_dict(doc.get("crop_size")) if doc.get("do_center_crop") else {}
    side = square_side([crop["height"], crop["width"]], "crop_size") if crop else None
    if "shortest_edge" in size:
        require(side is not None, "the processor resizes the shortest edge without a crop: the input is not square")
        mode, resize = "shorter_side", int(size["shortest_edge"])
    else:
        mode, resize = "squash", square_side([size.get("height"), size.get("width")], "the processor's size")
    side = side or resize
    normalize = doc.get("do_normalize", True)
    mean = tuple(float(v) for v in doc.get("image_mean", [0.5] * 3)) if normalize else (0.0,) * 3
    std = tuple(float(v) for v in doc.get("image_std", [0.5] * 3)) if normalize else (1.0,) * 3
    return Preprocessing(side, resize, _RESAMPLE[resample], mean, std, resize_mode=mode)
