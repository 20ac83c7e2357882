"""torchvision's VisionTransformer -> our ViT, and ImageNet weights through torchvision's weights API.

Name map (torchvision -> ours), per block i:
    conv_proj.weight (D, C, P, P)                          -> patch_embed.weight (D, P*P*C), patchify order
    class_token                                            -> cls_token
    encoder.pos_embedding                                  -> pos_embed
    encoder.layers.encoder_layer_i.ln_1 / ln_2             -> blocks.i.norm1 / norm2
    ...self_attention.in_proj_weight / in_proj_bias        -> blocks.i.attn.qkv (same q, k, v row order)
    ...self_attention.out_proj                             -> blocks.i.attn.proj
    ...mlp.0 / mlp.3 (older releases: mlp.linear_1/_2)      -> blocks.i.mlp.fc1 / fc2
    encoder.ln                                             -> norm
    heads.head                                             -> head
"""

from __future__ import annotations

import pickle  # for its exception class only: nothing here unpickles
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.config import IMAGENET_MEAN, IMAGENET_STD, VARIANTS, ViTConfig, canonical_variant
from model.vit import ViT

if TYPE_CHECKING:  # torchvision.models is imported lazily: model/ stays cheap to import
    from torchvision.models import VisionTransformer, WeightsEnum

_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "self_attention.out_proj": "attn.proj",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1",  # torchvision < 0.13 named the MLP's linears
    "mlp.linear_2": "mlp.fc2",
}


class PretrainedWeightsUnavailable(RuntimeError):
    """torchvision's weights file is neither in the hub cache nor downloadable (e.g. offline)."""


def convert_torchvision_state_dict(
    state_dict: Mapping[str, torch.Tensor], image_size: int | None = None
) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """Convert a torchvision VisionTransformer state dict; the architecture is read off the tensor shapes.

    image_size defaults to the side implied by the position embedding (224 for IMAGENET1K_V1, 518 for SWAG E2E).
    """
    sd = dict(state_dict)
    if "heads.pre_logits.weight" in sd:
        raise ValueError("torchvision ViTs with a representation_size (pre_logits layer) are not supported")
    conv = sd["conv_proj.weight"]  # (D, C, P, P)
    D, C, P, _ = conv.shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _LAYER.match(k)))
    first_mlp = "encoder.layers.encoder_layer_0.mlp."
    fc1 = first_mlp + ("0" if first_mlp + "0.weight" in sd else "linear_1")
    mlp_dim = sd[fc1 + ".weight"].shape[0]
    num_tokens = sd["encoder.pos_embedding"].shape[1]
    grid = round((num_tokens - 1) ** 0.5)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"position embedding has {num_tokens} tokens; expected 1 + a square number")
    config = ViTConfig(
        image_size=image_size or grid * P,
        patch_size=P,
        in_channels=C,
        hidden_dim=D,
        depth=depth,
        num_heads=_infer_heads(D),
        mlp_dim=mlp_dim,
        qkv_bias="encoder.layers.encoder_layer_0.self_attention.in_proj_bias" in sd,
        num_classes=sd["heads.head.weight"].shape[0],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    if config.grid_size != grid:
        raise ValueError(f"image_size {config.image_size} does not match the {grid}x{grid} position embedding")

    out: dict[str, torch.Tensor] = {
        # Conv2d weight (D, C, P, P) -> (D, P, P, C) -> (D, P*P*C): the column order of patchify's (p1 p2 c).
        "patch_embed.weight": conv.permute(0, 2, 3, 1).reshape(D, P * P * C),
        "patch_embed.bias": sd["conv_proj.bias"],
        "cls_token": sd["class_token"],
        "pos_embed": sd["encoder.pos_embedding"],
        "norm.weight": sd["encoder.ln.weight"],
        "norm.bias": sd["encoder.ln.bias"],
        "head.weight": sd["heads.head.weight"],
        "head.bias": sd["heads.head.bias"],
    }
    for key, value in sd.items():
        m = _LAYER.match(key)
        if not m:
            continue
        i, rest = m.groups()
        if rest.startswith("self_attention.in_proj_"):
            # nn.MultiheadAttention stacks q, k, v rows exactly as our fused qkv expects.
            out[f"blocks.{i}.attn.qkv.{rest.rsplit('_', 1)[1]}"] = value
            continue
        module, param = rest.rsplit(".", 1)
        if module not in _BLOCK_NAMES:
            raise ValueError(f"unexpected torchvision parameter {key!r}")
        out[f"blocks.{i}.{_BLOCK_NAMES[module]}.{param}"] = value
    return config, out


def _infer_heads(width: int) -> int:
    """Heads are not visible in the tensor shapes; every published ViT of a given width uses the same count."""
    for variant in VARIANTS.values():
        if variant.config.hidden_dim == width:
            return variant.config.num_heads
    return max(1, width // 64)  # head_dim 64, the convention behind all the published shapes


def from_torchvision(module: VisionTransformer) -> ViT:
    """Copy a torchvision VisionTransformer (any variant, any weights) into our ViT, numerically equal."""
    config, state_dict = convert_torchvision_state_dict(module.state_dict(), image_size=module.image_size)
    heads = getattr(module.encoder.layers[0].self_attention, "num_heads", config.num_heads)
    config = config.replace(
        num_heads=heads,
        dropout=float(module.dropout),
        attention_dropout=float(module.attention_dropout),
    )
    # Copies: the converted dict shares storage with the module's parameters, and the two must stay independent.
    model = ViT.from_weights(config, {k: v.clone() for k, v in state_dict.items()})
    # Same place and precision as the source, and the same train/eval mode (dropout behaves alike).
    ref = module.conv_proj.weight
    return model.to(device=ref.device, dtype=ref.dtype).train(module.training)


def weights_enum(name: str, weights: str | None = None) -> WeightsEnum:
    """torchvision's weights entry for a variant, e.g. ("b16", None) -> ViT_B_16_Weights.IMAGENET1K_V1."""
    from torchvision.models import get_model_weights

    variant = VARIANTS[canonical_variant(name)]
    if variant.torchvision_builder is None:
        raise ValueError(
            f"torchvision has no pretrained weights for variant {name!r}; "
            f"pretrained variants are {sorted(k for k, v in VARIANTS.items() if v.torchvision_builder)}"
        )
    enum = get_model_weights(variant.torchvision_builder)
    member = weights or variant.default_weights
    try:
        return enum[member]
    except KeyError:
        raise ValueError(f"{enum.__name__} has no member {member!r}; choose one of {[m.name for m in enum]}") from None


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub caches a downloaded weights file (TORCH_HOME/hub/checkpoints/<file name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def load_pretrained(name: str, num_classes: int | None = None, weights: str | None = None) -> ViT:
    """Our ViT with torchvision's ImageNet weights; the head is replaced (zero init) when num_classes is given.

    Uses the hub cache when the file is there; downloads otherwise. Raises PretrainedWeightsUnavailable with
    the exact file name and folder when neither works.
    """
    entry = weights_enum(name, weights)
    state_dict = fetch_state_dict(entry)
    min_size = entry.meta.get("min_size", (None,))[0]
    # The architecture comes from the file's tensor shapes (heads from the width), not from the name.
    config, converted = convert_torchvision_state_dict(state_dict, image_size=min_size)
    model = ViT.from_weights(config, converted)
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_head(num_classes)
    return model


def fetch_state_dict(entry: WeightsEnum) -> dict[str, torch.Tensor]:
    """A torchvision weights entry's state dict, from the hub cache or downloaded (weights_only: no arbitrary
    unpickling). Raises PretrainedWeightsUnavailable with the exact file name and folder when neither works."""
    target = hub_checkpoint_path(entry.url)
    try:
        state_dict: dict[str, torch.Tensor] = entry.get_state_dict(progress=True, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        raise PretrainedWeightsUnavailable(
            f"could not get torchvision's {type(entry).__name__}.{entry.name} weights ({err}). "
            f"Download {entry.url} on a machine with network access and place it as {target} "
            f"(the torch hub cache; set TORCH_HOME to move it), then run again."
        ) from err
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        # A partial or wrong file placed by hand. torch's own unpickling message advises weights_only=False:
        # never repeat that for a file we can't vouch for.
        lines = str(err).strip().splitlines()
        reason = "not a PyTorch weights file" if isinstance(err, pickle.UnpicklingError) or not lines else lines[0]
        raise PretrainedWeightsUnavailable(
            f"{target} is not a readable weights file ({reason}). Delete it and download {entry.url} again "
            "(compare the hash in its name with `sha256sum`)."
        ) from None
    return state_dict
