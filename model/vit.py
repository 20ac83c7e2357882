"""The Vision Transformer (Dosovitskiy et al., 2021), written from its parts.

Pipeline, each stage a named method of ViT:
    normalize -> patchify -> patch_embed -> prepend_cls -> + position_embedding -> dropout [-> norm_pre]
    -> pre-norm blocks -> final LayerNorm -> CLS [-> feature_proj] [-> L2 normalise] -> head

The bracketed stages, and LayerScale and quick_gelu inside the blocks, are ViTConfig switches that CLIP's and
DINOv2's image towers need (model/convert/clip.py, model/convert/dinov2.py); a plain ViT has none of them.

A distilled ViT (ViTConfig.distilled; DeiT, Touvron et al. 2021) has a second special token right after CLS,
dist_token, with its own position embedding row and its own head, head_dist. Training reads both heads
(forward_train: the CLS head learns the labels, head_dist the teacher); inference averages their logits.

Parameter names follow timm (cls_token, pos_embed, blocks.N.attn.qkv, ...); model/convert/pretrained.py maps
torchvision's names onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ViTConfig


def resample_position_embedding(
    pos_embed: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """(1, prefix + n*n, D) position embeddings of a square n x n grid -> (1, prefix + rows*cols, D) for `grid`.

    Bicubic, align_corners=False, computed in float32: transformers' ViT, CLIP and DINOv2 interpolate_pos_encoding
    (antialias=True is timm's resample_abs_pos_embed, which smooths when shrinking). Only the patch rows are
    resampled: the special tokens' rows have no place in the grid and are kept as they are.
    """
    special_pos, patch_pos = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, p, D), (1, N, D)
    N, D = patch_pos.shape[1:]
    native = round(N**0.5)
    if native * native != N:
        raise ValueError(f"{N} position embeddings are not a square grid")
    # (1, native*native, D) -> (1, D, native, native) so interpolate sees a D-channel image
    patch_pos = patch_pos.reshape(1, native, native, D).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    # (1, D, rows, cols) -> (1, rows*cols, D)
    patch_pos = patch_pos.to(special_pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)
    return torch.cat([special_pos, patch_pos], dim=1)  # (1, prefix + rows*cols, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    Two paths computing the same function: scaled_dot_product_attention (fused kernels, no weights to look at)
    and an explicit softmax that also returns the (B, heads, T, T) weights for attention rollout. The weights
    can't be hooked from the fast path, so callers that want them must ask for the explicit path.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_dim, 3 * config.hidden_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_dim, config.hidden_dim)
        self.attn_drop = nn.Dropout(config.attention_dropout)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        # (B, T, 3D) -> (B, T, 3, heads, head_dim) -> (3, B, heads, T, head_dim)
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = None
        if return_attention:
            # Softmax in float32 whatever the model's dtype: these weights feed attention rollout, a product over
            # every block that bfloat16's 8-bit mantissa would blur, and SDPA's fused kernels also normalise in
            # float32, so the heatmap path's logits stay those of the fast path.
            weights = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, heads, T, T) float32
            out = self.attn_drop(weights).to(v.dtype) @ v
        else:
            drop = self.attention_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        # (B, heads, T, head_dim) -> (B, T, heads, head_dim) -> (B, T, D)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out)), weights


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (its weights expect it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT, Touvron et al. 2021; used by DINOv2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # timm's name, so timm checkpoints map one to one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class MLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_dim, config.mlp_dim)
        # exact erf GELU, as torchvision and the original ViT use; quick_gelu for OpenAI CLIP's towers
        self.act = QuickGELU() if config.activation == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        return out


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        # Identity unless LayerScale: a plain ViT's state dict has no ls1/ls2 entries.
        self.ls1 = LayerScale(config.hidden_dim) if config.layer_scale else nn.Identity()
        self.ls2 = LayerScale(config.hidden_dim) if config.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), return_attention)
        x = x + self.ls1(attended)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, weights


class ViT(nn.Module):
    mean: torch.Tensor  # (1, C, 1, 1) float32 buffers, registered by _set_normalisation
    std: torch.Tensor

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        P, C, D = config.patch_size, config.in_channels, config.hidden_dim
        # Normalisation lives in the model so callers can ship uint8 images to the device (4x fewer bytes than
        # float32) and no caller can forget it or apply it twice. Not persistent: the config carries the values.
        self._set_normalisation()
        self.patch_embed = nn.Linear(P * P * C, D)
        self.num_prefix_tokens = config.num_prefix_tokens  # CLS (+ the distillation token), then the patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if config.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + config.num_patches, D))
        self.pos_drop = nn.Dropout(config.dropout)
        self.norm_pre = nn.LayerNorm(D, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        projection = config.projection_dim
        self.feature_proj = nn.Linear(D, projection, bias=False) if projection else None
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.head_dist = nn.Linear(D, config.num_classes) if config.distilled else None
        self.reset_parameters()

    @classmethod
    def from_weights(cls, config: ViTConfig, state_dict: Mapping[str, torch.Tensor]) -> ViT:
        """Build a model straight from weights, skipping the random init they would overwrite.

        The parameters are created on the meta device and the given tensors adopted (cast to float32, the dtype a
        fresh model has): for ViT-B that saves seconds of trunc_normal_. The model owns the tensors afterwards,
        so pass copies of tensors that something else still uses.
        """
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        tensors = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state_dict.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        # Non-persistent buffers are not in the state dict: rebuild them where the weights live.
        model._set_normalisation(model.patch_embed.weight.device)
        return model

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ViT:
        # Module.to(torch.bfloat16) casts floating buffers too; keep the normalisation constants in float32,
        # where normalize works (bf16 keeps under 3 significant digits: every input would shift by up to 0.2%).
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves Module._apply unannotated
        if self.mean.dtype != torch.float32:
            self._set_normalisation(self.mean.device)
        return self

    def _set_normalisation(self, device: torch.device | str | None = None) -> None:
        shape = (1, self.config.in_channels, 1, 1)
        for name, values in (("mean", self.config.mean), ("std", self.config.std)):
            # float32 whatever the default dtype: normalize computes in float32 (see _apply)
            tensor = torch.tensor(values, dtype=torch.float32, device=device).view(shape)
            self.register_buffer(name, tensor, persistent=False)

    # ------------------------------------------------------------------ initialisation and head surgery
    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (timm / DeiT recipe)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)  # as timm initialises DeiT's distillation token
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.ones_(module.gamma)  # an identity scale; the imports that use LayerScale bring their own
        # A zero head starts every class at equal logits, so early gradients shape features, not a random head.
        for head in self.classifiers():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def classifiers(self) -> list[nn.Linear]:
        """The classifiers: [head], or [head, head_dist] for a distilled model."""
        return [self.head] if self.head_dist is None else [self.head, self.head_dist]

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier(s) with fresh zero-initialised ones (transfer to a new label set)."""
        ref = self.head.weight

        def fresh() -> nn.Linear:
            head = nn.Linear(self.config.feature_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            return head

        self.head = fresh()
        if self.head_dist is not None:
            self.head_dist = fresh()
        self.config = self.config.replace(num_classes=num_classes)

    # ------------------------------------------------------------------ pipeline stages
    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate (B, C, H, W) and return the patch grid (rows, cols)."""
        C, P = self.config.in_channels, self.config.patch_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != C:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, {C}, H, W), got {got}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"expected uint8 images in 0..255 or float images in 0..1, got dtype {x.dtype}")
        H, W = x.shape[-2:]
        if H % P or W % P or H == 0 or W == 0:
            raise ValueError(f"image height and width must be positive multiples of the patch size {P}, got {H}x{W}")
        return H // P, W // P

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 or float 0..1 -> mean/std normalised, in the parameters' dtype.

        (x / 255 - mean) / std is folded into one multiply-add, x * scale + shift, so the image is read once and
        written once; the arithmetic runs in float32 even for a bf16 model (uint8 / 255 is not exact in bf16).
        """
        mean, std = self.mean, self.std  # float32 whatever the model's dtype (see _apply)
        scale = (255.0 * std).reciprocal() if x.dtype == torch.uint8 else std.reciprocal()  # (1, C, 1, 1)
        # x.float() is free for float32 input; uint8 and half inputs get their one unavoidable conversion.
        x = torch.addcmul(-mean / std, x.float(), scale)  # (B, C, H, W), float32
        return x.to(self.patch_embed.weight.dtype)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Cut into non-overlapping patches, row-major: 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'."""
        B, C, H, W = x.shape
        P = self.config.patch_size
        # (B, C, H, W) -> (B, C, h, P, w, P) -> (B, h, w, P, P, C) -> (B, h*w, P*P*C)
        x = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // P) * (W // P), P * P * C)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLS (and, distilled, the distillation token right after it) before the patch tokens."""
        tokens_in: list[torch.Tensor] = (
            [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        )
        special = [token.expand(tokens.shape[0], -1, -1) for token in tokens_in]  # each (1, 1, D) -> (B, 1, D)
        return torch.cat([*special, tokens], dim=1)  # (B, N, D) -> (B, prefix + N, D), prefix = 1 or 2

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Learned position embedding for a (rows, cols) patch grid, bicubic-resampled off the native grid.

        Only the patch rows are resampled: the special tokens' rows (CLS, and the distillation token) have no
        place in the grid and are kept as they are.
        """
        native = self.config.grid_size
        if grid == (native, native):
            return self.pos_embed
        return resample_position_embedding(self.pos_embed, self.num_prefix_tokens, grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the token sequence the first block sees, (B, prefix + N, D)."""
        grid = self.check_input(x)
        x = self.normalize(x)
        tokens = self.patch_embed(self.patchify(x))  # (B, N, P*P*C) -> (B, N, D)
        tokens = self.prepend_cls(tokens)
        tokens = tokens + self.position_embedding(grid)
        embedded: torch.Tensor = self.norm_pre(self.pos_drop(tokens))
        return embedded

    # ------------------------------------------------------------------ forward variants
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final normalised tokens (B, prefix + N, D); token 0 is CLS, token 1 (distilled) the
        distillation token."""
        tokens = self.embed(x)
        for block in self.blocks:
            tokens, _ = block(tokens)
        normed: torch.Tensor = self.norm(tokens)
        return normed

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (B, classes), or the feature (B, D) the head reads with pre_logits=True (linear probes).

        A distilled model answers with the mean of its two heads' logits, DeiT's inference rule; its pre-logits
        feature is the mean of the two tokens (timm's choice).
        """
        if self.head_dist is None:
            feature = self.head_input(tokens[:, 0])
            return feature if pre_logits else self.head(feature)
        if pre_logits:
            return (tokens[:, 0] + tokens[:, 1]) / 2
        cls_logits, dist_logits = self.forward_heads(tokens)
        return (cls_logits + dist_logits) / 2

    def head_input(self, cls: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm (B, D) -> what the head reads (B, feature_dim): projected into the
        image-text space and L2-normalised when the config says so (CLIP), else the token itself."""
        if self.feature_proj is not None:
            cls = self.feature_proj(cls)  # (B, D) -> (B, projection_dim)
        if self.config.normalize_features:
            cls = F.normalize(cls, dim=-1)  # x / max(|x|, 1e-12), as CLIP divides by the norm
        return cls

    def forward_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A distilled model's two heads apart: (CLS head logits, distillation head logits), each (B, classes)."""
        if self.head_dist is None:
            raise ValueError("forward_heads needs a distilled model (ViTConfig(distilled=True)); this one has one head")
        return self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes) as forward gives them, the CLS feature (B, D) after the final LayerNorm): what the
        open-set score reads (model/trust.py), from the same single pass. A distilled model's feature is its CLS
        token alone, the one its label-trained head reads."""
        tokens = self.forward_features(x)
        return self.forward_head(tokens), tokens[:, 0]

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distillation training: (CLS head logits, distillation head logits), each (B, classes). The CLS head
        learns the true labels, the distillation head the teacher (training/distill.py)."""
        return self.forward_heads(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (as forward gives them) plus every block's attention weights, each (B, heads, T, T) with
        T = prefix + N (CLS first, then the distillation token when distilled), via the explicit path."""
        tokens = self.embed(x)
        attentions = []
        for block in self.blocks:
            tokens, weights = block(tokens, return_attention=True)
            attentions.append(weights)
        return self.forward_head(self.norm(tokens)), attentions

    # ------------------------------------------------------------------ bookkeeping
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self, image_size: int | None = None) -> float:
        """Forward multiply-add FLOPs (2 per MAC) of the matmuls at a square image size; attention included."""
        c = self.config
        n = (image_size or c.image_size) // c.patch_size
        T, D = n * n + c.num_prefix_tokens, c.hidden_dim
        per_block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * c.mlp_dim
        embed = 2 * n * n * D * c.patch_size**2 * c.in_channels
        heads = c.num_prefix_tokens * 2 * c.feature_dim * c.num_classes  # one head per special token
        projection = 2 * D * c.projection_dim
        return float(c.depth * per_block + embed + projection + heads)


__all__ = ["MLP", "Attention", "Block", "LayerScale", "QuickGELU", "ViT"]
