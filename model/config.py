"""ViT hyper-parameters and the table of named variants.

A variant name ("b16", "s16", ...) is the short form of torchvision's builder name ("vit_b_16", ...): both are
accepted everywhere a variant is asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# ImageNet statistics: torchvision's pretrained ViTs were trained on images normalised with these, so a model
# fine-tuned from them must see the same normalisation (the model applies it itself, see ViT.normalize).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size_for(image_size: int) -> int:
    """Shorter side before the eval centre crop: torchvision's ImageNet 256/224 ratio. The one definition shared
    by the eval transform (training.data) and the artifact's preprocessing metadata the service follows."""
    return round(image_size * 256 / 224)


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224  # native input side; position embeddings are learned for this grid
    patch_size: int = 16  # side of the square patches; image_size must be a multiple of it
    in_channels: int = 3
    hidden_dim: int = 768  # token width D
    depth: int = 12  # number of encoder blocks
    num_heads: int = 12  # hidden_dim must divide evenly between heads
    mlp_dim: int = 3072  # hidden width of each block's MLP (4 * D in every published ViT)
    dropout: float = 0.0  # after the position embedding, in the MLP and after attention's projection
    attention_dropout: float = 0.0  # on the attention weights themselves
    qkv_bias: bool = True  # torchvision's in_proj has a bias; keep it so its weights load exactly
    num_classes: int = 37  # Oxford-IIIT Pet breeds; 1000 for ImageNet heads
    # per-channel normalisation applied inside the model; one value per input channel (in_channels of them)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    layer_norm_eps: float = 1e-6  # torchvision and the original JAX ViT use 1e-6, not PyTorch's default 1e-5
    # DeiT (Touvron et al. 2021): a distillation token right after CLS, with its own position embedding and its
    # own head (head_dist) that learns from a teacher; at inference the two heads' logits are averaged.
    distilled: bool = False
    # Switches for the towers of image-text and self-supervised models (model/convert/clip.py, dinov2.py,
    # timm_vit.py). Each default is the plain ViT's behaviour, and to_dict leaves a field out while it has its
    # default, so artifacts written before these existed load and hash unchanged.
    # A LayerNorm (norm_pre) between the position embedding and the first block: CLIP's pre_layrnorm.
    pre_norm: bool = False
    # The MLP's activation: "gelu" (exact erf) or "quick_gelu", x * sigmoid(1.702 x), which OpenAI's CLIP used.
    activation: str = "gelu"
    # A learned per-channel scale (ls1, ls2) on each residual branch before it joins the stream: LayerScale (CaiT,
    # Touvron et al. 2021), as DINOv2 uses it.
    layer_scale: bool = False
    # > 0: a bias-free linear map (feature_proj, D -> projection_dim) of the CLS token after the final norm, which
    # the head then reads: CLIP's visual_projection into the image-text space.
    projection_dim: int = 0
    # L2-normalise the head's input: with a head of unit text embeddings x the logit scale, the logits are CLIP's
    # cosine similarities x logit_scale, exactly.
    normalize_features: bool = False
    # Position embeddings are learned for the image_size grid; any other grid is resampled bicubically
    # (align_corners False, in float32) at run time, as transformers' ViT, CLIP and DINOv2 interpolate_pos_encoding
    # do. An importer whose processor crops another size resamples them once, with the source library's own rule
    # (timm's adds antialiasing), and stores them at that size: exact there and at the published size.

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "in_channels", "hidden_dim", "depth", "num_heads", "mlp_dim")
        for name in sizes:  # checked first: a zero patch_size or num_heads would divide by zero below
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} does not divide into {self.num_heads} heads")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need {self.in_channels} values each, got {self.mean}, {self.std}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        for name in ("distilled", "pre_norm", "layer_scale", "normalize_features"):
            if not isinstance(getattr(self, name), bool):  # --set distilled=yes would otherwise be truthy, half-working
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.projection_dim, int) or self.projection_dim < 0:
            raise ValueError(f"projection_dim must be 0 (none) or a positive integer, got {self.projection_dim!r}")
        if self.distilled and (self.projection_dim or self.normalize_features):
            raise ValueError("a distilled ViT's two heads read the raw tokens: no projection_dim or normalize_features")

    @property
    def grid_size(self) -> int:
        """Patches per side at the native image size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def feature_dim(self) -> int:
        """Width of the feature the head reads: the projection's when there is one, else the token width D."""
        return self.projection_dim or self.hidden_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_prefix_tokens(self) -> int:
        """Special tokens before the patches: CLS, and the distillation token when distilled."""
        return 2 if self.distilled else 1

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields()}
        # `distilled` is stored only when set: a plain ViT's config stays the document petvit always wrote, so
        # older releases (which refuse unknown fields) still read every non-distilled artifact, and the linear
        # probe's feature-cache keys (a hash of this dict) stay valid.
        # The tower switches likewise: stored only when they differ from the plain ViT.
        for f in fields():
            if f.name in _STORED_WHEN_SET and data[f.name] == f.default:
                del data[f.name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in fields()}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {sorted(unknown)}; known fields are {sorted(known)}")
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**values)  # type: ignore[arg-type]  # field types are checked by the dataclass's users


ACTIVATIONS = ("gelu", "quick_gelu")
_STORED_WHEN_SET = ("distilled", "pre_norm", "activation", "layer_scale", "projection_dim", "normalize_features")


def fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(ViTConfig)


@dataclass(frozen=True)
class Variant:
    """One row of the variant table: the architecture plus where torchvision keeps pretrained weights for it."""

    config: ViTConfig
    torchvision_builder: str | None = None  # e.g. "vit_b_16"; None for the small variants torchvision lacks
    default_weights: str | None = None  # member of torchvision's weights enum loaded by default


def _vit(patch: int, width: int, depth: int, heads: int, image_size: int = 224) -> ViTConfig:
    return ViTConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=4 * width,
    )


# Widths, depths and heads as in Dosovitskiy et al. (2021) and DeiT (Touvron et al. 2021) for ti/s.
VARIANTS: dict[str, Variant] = {
    "ti16": Variant(_vit(16, 192, 12, 3)),  # DeiT-Tiny shape: the CPU-friendly from-scratch model
    "s16": Variant(_vit(16, 384, 12, 6)),  # DeiT-Small shape
    "b16": Variant(_vit(16, 768, 12, 12), "vit_b_16", "IMAGENET1K_V1"),  # 86M parameters
    "b32": Variant(_vit(32, 768, 12, 12), "vit_b_32", "IMAGENET1K_V1"),  # 4x fewer tokens than B/16
    "l16": Variant(_vit(16, 1024, 24, 16), "vit_l_16", "IMAGENET1K_V1"),  # 304M parameters
    "l32": Variant(_vit(32, 1024, 24, 16), "vit_l_32", "IMAGENET1K_V1"),
    # torchvision only ships SWAG weights for H/14, trained end to end at 518 px; 632M parameters.
    "h14": Variant(_vit(14, 1280, 32, 16), "vit_h_14", "IMAGENET1K_SWAG_E2E_V1"),
}


def canonical_variant(name: str) -> str:
    """Map "vit_b_16", "ViT-B/16", "b16" ... to the table key "b16"."""
    key = name.lower().replace("vit", "").replace("_", "").replace("-", "").replace("/", "")
    if key not in VARIANTS:
        raise KeyError(f"unknown ViT variant {name!r}; choose one of {sorted(VARIANTS)} (or vit_b_16 style names)")
    return key


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The variant's config with any field overridden, e.g. get_config("b16", depth=2, num_classes=37)."""
    return VARIANTS[canonical_variant(name)].config.replace(**overrides)
