"""One epoch: the optimizer steps over a batch iterator, and the held-out pass that picks the best epoch.

Both work on whatever module a recipe trains (a whole ViT, DDP-wrapped or not, or a linear head over cached
features) and on any iterable of (inputs, targets) batches: a DataLoader, FeatureBatches, or a list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.distributed import DistInfo, all_reduce_sum
from training.recipes import TrainConfig, lr_at

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (inputs, integer targets (B,)) per batch
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# A distillation loss (training/distill.py's DistillationLoss): (module, inputs, targets, label_smoothing) ->
# (loss, the logits accuracy is counted on).
TeacherLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Runtime:
    """Where this process computes: its device, the autocast dtype, its DataLoader workers, its DDP rank."""

    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype; None = plain fp32
    workers: int = 0
    info: DistInfo = field(default_factory=DistInfo)

    @property
    def show(self) -> bool:
        """Only rank 0 draws progress bars and prints: eight ranks would print everything eight times."""
        return self.info.is_main


@dataclass(frozen=True)
class LRSchedule:
    """lr_at's linear warmup + cosine, sized to this run. A pure function of the global step: a resumed run
    lands on the same LR without any scheduler state."""

    peak: float
    floor: float
    total_steps: int
    warmup_steps: int

    @classmethod
    def for_recipe(cls, cfg: TrainConfig, steps_per_epoch: int) -> LRSchedule:
        return cls(cfg.lr, cfg.min_lr, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak, self.floor)


@dataclass(frozen=True)
class Optimization:
    """What every training step applies: optional batch mixing, the label-smoothed loss (or a distillation loss
    built around it), gradient clipping, and an AdamW update at the scheduled LR."""

    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    mixer: Mixer | None = None  # MixUp/CutMix: the loss sees soft targets (B, C), accuracy the hard ones
    distillation: TeacherLoss | None = None  # a teacher's loss in place of plain cross-entropy (recipe distill)

    @classmethod
    def for_recipe(
        cls,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        steps_per_epoch: int,
        mixer: Mixer | None = None,
        distillation: TeacherLoss | None = None,
    ) -> Optimization:
        schedule = LRSchedule.for_recipe(cfg, steps_per_epoch)
        return cls(optimizer, schedule, cfg.label_smoothing, cfg.grad_clip, mixer, distillation)

    def loss(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's (loss, logits (B, C) accuracy is counted on), from the module's forward on `inputs`."""
        if self.distillation is not None:
            return self.distillation(module, inputs, targets, self.label_smoothing)
        logits = module(inputs)  # (B, C)
        # Loss in fp32 even under bf16 autocast: log-softmax over 37 classes is cheap and precision-sensitive.
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing), logits


class EpochStats(TypedDict):
    """One rank's sums over an epoch (training/loop.py all-reduces the first three across ranks)."""

    loss_sum: float  # per-example loss, summed
    correct: float  # top-1 hits against the hard targets
    seen: int  # examples
    lr: float  # the last step's learning rate


def train_one_epoch(
    module: nn.Module, batches: Batches, opt: Optimization, step: int, env: Runtime, desc: str | None = "train"
) -> tuple[int, EpochStats]:
    """One pass over `batches`, one optimizer step per batch, starting at global step `step`.

    Returns the global step after the epoch and this rank's sums: loss_sum, correct, seen, and the last lr.
    `desc` labels the progress bar; None draws none (ranks other than 0, benchmarks).
    """
    device, amp = env.device, env.amp
    module.train()
    loss_sum, correct, seen = 0.0, torch.zeros((), dtype=torch.long, device=device), 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None)
    lr = opt.schedule.peak
    for inputs, targets in bar:
        lr = opt.schedule(step)
        for group in opt.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        hard = targets  # (B,) class indices: accuracy is counted against these even when the loss sees mixed ones
        if opt.mixer is not None:
            inputs, targets = opt.mixer(inputs, targets)  # targets become soft (B, C)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, logits = opt.loss(module, inputs, targets)  # (), (B, C)
        loss_value = loss.item()  # the one host sync per step: the NaN guard, the bar and the epoch mean share it
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr")
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip > 0:
            nn.utils.clip_grad_norm_(module.parameters(), opt.grad_clip)
        opt.optimizer.step()
        step += 1
        batch = hard.shape[0]
        loss_sum += loss_value * batch
        correct += (logits.argmax(dim=1) == hard).sum()  # stays on the device until the epoch ends
        seen += batch
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
    return step, EpochStats(loss_sum=loss_sum, correct=float(correct), seen=seen, lr=lr)


@torch.no_grad()
def held_out_accuracy(module: nn.Module, batches: Batches, env: Runtime) -> tuple[float, float]:
    """(loss, top-1) over this rank's shard of the held-out batches, summed over the ranks of env.info."""
    device, amp = env.device, env.amp
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = module(inputs)  # (B, C)
        totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        totals[1] += (logits.argmax(dim=1) == targets).sum().item()
        totals[2] += targets.shape[0]
    totals = all_reduce_sum(totals, env.info)
    n = max(totals[2].item(), 1.0)
    return totals[0].item() / n, totals[1].item() / n
