"""Heatmap methods: one run of the model, and the heatmaps each method makes of it.

The inference face (model/inference.py) and the heatmap evaluation (training/heatmaps.py) both call `heatmaps`, so what
`petvit evaluate --heatmaps` measures is what POST /classify serves. The maths is in model/rollout.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from model.rollout import HeadFusion, attention_rollout, gradient_rollout
from model.vit import ViT

HeatmapKind = Literal["rollout", "gradient"]


class GradientUnavailableError(ValueError):
    """Gradient rollout was asked of a model autograd cannot differentiate (e.g. with int8-quantised layers)."""


@dataclass(frozen=True)
class HeatmapMethod:
    """Attention rollout with a head fusion and a discard ratio, or gradient rollout (class-specific)."""

    kind: HeatmapKind
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("rollout", "gradient"):
            raise ValueError(f"heatmap kind must be 'rollout' or 'gradient', got {self.kind!r}")
        if self.head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {self.head_fusion!r}")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")

    @property
    def key(self) -> str:
        """The method's name in reports: 'rollout:mean:0.9', 'gradient'."""
        if self.kind == "gradient":
            return "gradient"
        return f"rollout:{self.head_fusion}:{self.discard_ratio:g}"

    @property
    def needs_gradient(self) -> bool:
        return self.kind == "gradient"


GRADIENT_ROLLOUT = HeatmapMethod("gradient")
PLAIN_ROLLOUT = HeatmapMethod("rollout", "mean", 0.0)  # Abnar & Zuidema's rollout; the service's map until now

# What POST /classify offers as heatmap_method, and its default. The default is the best-measured method: highest
# pointing game, then highest heat mass on the object, on the localisation test (tests/training/test_heatmaps.py;
# figures in docs/service.md, "Heatmaps"). Rerun `petvit evaluate --heatmaps` on Pets and change it here if Pets
# says otherwise.
SERVICE_METHODS: dict[str, HeatmapMethod] = {
    "rollout": HeatmapMethod("rollout", "mean", 0.9),
    "gradient": GRADIENT_ROLLOUT,
}
DEFAULT_METHOD = "rollout"


def measured_methods(
    fusions: Sequence[HeadFusion] = ("mean", "max", "min"), discard_ratios: Sequence[float] = (0.0, 0.5, 0.9)
) -> list[HeatmapMethod]:
    """Every rollout setting worth comparing, then gradient rollout: the rows of the evaluation's table."""
    rollouts = [HeatmapMethod("rollout", f, r) for f in fusions for r in discard_ratios]
    return [*rollouts, GRADIENT_ROLLOUT]


def heatmaps(
    model: ViT, images: torch.Tensor, methods: Sequence[HeatmapMethod], targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B, 3, H, W) images -> (logits (B, classes), {method.key: (B, rows, cols) heatmap in [0, 1]}), detached.

    One forward pass with attention serves every method. Gradient rollout adds one backward pass, to the attention
    of every block, from the logit of `targets` (default: each image's predicted class, the one the service
    shows). It runs with autograd on even inside torch.inference_mode or no_grad, and needs a model autograd can
    differentiate (float weights); the weights' own gradients are neither computed nor stored.
    """
    grid = model.check_input(images)
    gradients: tuple[torch.Tensor, ...] | None = None
    if any(m.needs_gradient for m in methods):
        logits, attentions, gradients = _attention_and_gradients(model, images, targets)
    else:
        logits, attentions = model.forward_with_attention(images)
        logits, attentions = logits.detach(), [a.detach() for a in attentions]
    maps = {}
    for method in methods:
        if method.needs_gradient:
            assert gradients is not None  # computed above whenever a method needs them
            maps[method.key] = gradient_rollout(attentions, gradients, grid=grid)
        else:
            maps[method.key] = attention_rollout(attentions, method.head_fusion, method.discard_ratio, grid=grid)
    return logits, maps


def _attention_and_gradients(
    model: ViT, images: torch.Tensor, targets: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Logits, attention and d(target logit)/d(attention) per block, all detached."""
    # inference_mode(False) inside the service's inference_mode: the graph must be recorded. The images enter as
    # float 0..1 that require grad (ViT.normalize takes both), so every attention map is in the graph even when
    # the weights are frozen; autograd.grad then walks only the paths from the logits to the attention.
    with torch.inference_mode(False), torch.enable_grad():
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        logits, attentions = model.forward_with_attention(x.requires_grad_())
        chosen = logits.detach().argmax(dim=-1) if targets is None else targets.to(logits.device)
        # Images are independent through the network, so one backward of the batch's summed target logits gives
        # each image the gradient of its own logit.
        score = logits.gather(1, chosen[:, None]).sum()  # (B, classes) -> (B, 1) -> ()
        try:
            gradients = torch.autograd.grad(score, attentions)
        except RuntimeError as err:  # e.g. torchao's int8 layers, whose activation quantisation has no gradient
            raise GradientUnavailableError(
                "gradient rollout needs gradients from the logits to every block's attention, and this model's "
                f"layers do not give them (an int8-quantised model?): {err}. Attention rollout needs none"
            ) from err
    return logits.detach(), [a.detach() for a in attentions], gradients


__all__ = [
    "DEFAULT_METHOD",
    "GRADIENT_ROLLOUT",
    "PLAIN_ROLLOUT",
    "SERVICE_METHODS",
    "GradientUnavailableError",
    "HeatmapMethod",
    "heatmaps",
    "measured_methods",
]
