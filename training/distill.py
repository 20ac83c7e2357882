"""DeiT's distillation objective (Touvron et al. 2021, "Training data-efficient image transformers & distillation
through attention"): a distilled ViT's CLS head learns the true labels, its distillation head learns the teacher.

    hard (DeiT's best):       (1 - a) CE(cls, y) + a CE(dist, argmax teacher)                 a = 0.5 by default
    soft (Hinton et al. 2015): (1 - a) CE(cls, y) + a t^2 KL(softmax(teacher / t) || softmax(dist / t))

The teacher runs frozen (eval mode, no_grad) on the very batch the student sees: after augmentation and, with
--mixup, after MixUp/CutMix. DeiT feeds the teacher the mixed images, so the teacher's answer follows the mixing
and the distillation head gets a label for the image it actually saw. The CLS term keeps the recipe's label
smoothing (and MixUp's soft targets); the teacher's term has none, as in DeiT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.vit import ViT

DISTILL_MODES = ("hard", "soft")


class TwoHeads(nn.Module):
    """The distilled student as a distillation step calls it: forward -> (CLS logits, distillation logits).

    A module rather than a call to ViT.forward_train: DDP averages the gradients of what runs through its own
    forward, so under torchrun it wraps this. It holds the student only; the teacher is no part of it, so the
    step's train() never touches the teacher's batch norms and DDP never sees its weights.
    """

    def __init__(self, student: ViT) -> None:
        super().__init__()
        if not student.config.distilled:
            raise ValueError("distillation needs a student with a distillation token (ViTConfig(distilled=True))")
        self.student = student

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_train(x)  # (B, classes) each


@dataclass(frozen=True)
class DistillationLoss:
    """The loss of one distillation step; training/epoch.py's Optimization calls it when a plan distils."""

    teacher: nn.Module  # frozen, eval mode: (B, 3, H, W) -> (B, classes)
    mode: str = "hard"  # "hard": the teacher's argmax as a label; "soft": its tempered distribution
    alpha: float = 0.5  # weight of the teacher's term; 1 - alpha goes to the true labels
    tau: float = 3.0  # soft mode's temperature

    def __post_init__(self) -> None:
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"distill tau must be positive, got {self.tau}")

    def __call__(
        self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the logits accuracy is counted on). `module` returns (CLS logits, distillation logits) (TwoHeads,
        DDP-wrapped or not); targets are class indices (B,) or MixUp's soft targets (B, C). The counted logits are
        the mean of the two heads: what the model answers at inference."""
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).float()  # (B, C)
        cls_logits, dist_logits = module(inputs)  # (B, C) each
        # Losses in float32 even under bf16 autocast: log-softmax over the classes is cheap and precision-sensitive.
        base = F.cross_entropy(cls_logits.float(), targets, label_smoothing=label_smoothing)
        loss = (1.0 - self.alpha) * base + self.alpha * self.teacher_term(dist_logits.float(), teacher_logits)
        return loss, (cls_logits + dist_logits) / 2

    def teacher_term(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """What the distillation head is taught, from (B, C) float32 logits of the student's head and the teacher."""
        if self.mode == "hard":
            return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        tau = self.tau
        # KL(teacher || student) per image, averaged over the batch ("batchmean" is the KL divergence itself).
        # t^2 keeps the gradients' scale independent of t (Hinton et al.). DeiT's code divides the summed KL by
        # B * C instead of B, which shrinks this term by the number of classes.
        student, teacher = F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1)
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * tau * tau
