"""How each recipe trains: what the loop in training/loop.py asks of a recipe, in one object per kind.

HeadOnFeatures  linear-probe: the backbone is frozen, so its CLS features are extracted once (rank 0, cached on
                disk) and only model.head trains, on those features; an epoch is a few matrix multiplies.
WholeNetwork    finetune and scratch: every weight trains on augmented images (optionally MixUp/CutMix-ed),
                each DDP rank on its own shard of the train split, DDP averaging the gradients.
Distillation    distill (DeiT): WholeNetwork for a ViT with a distillation token; the step calls both heads and
                the loss brings in a frozen teacher's answers on the same batch (training/distill.py).
ConvNetTeacher  teacher: WholeNetwork for a torchvision convnet, written as a convnet teacher artifact.

The loop only talks to a plan: `trained` (the part of the model that learns: its parameters go to AdamW, its
weights to the run directory's state and best-weights files), `step_module` (what a training step calls),
`mixer` and `distillation` (what the steps apply), prepare(), epoch_runtime(), epoch_batches(), `val_batches`,
test_logits(), and for the run's records `image_size`, `model_name`, fingerprint(), training_record() and
write_artifact().
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from model.artifact import ArtifactMetadata, save_artifact
from model.convert.teachers import ConvNet, load_teacher, save_convnet_artifact
from model.vit import ViT
from training.data import DataConfig, DataSplits, batch_mixer, eval_transform, train_transform
from training.distill import DistillationLoss, TwoHeads
from training.distributed import DistInfo
from training.epoch import Batches, Mixer, Runtime, TeacherLoss
from training.evaluate import predict
from training.features import cached_features
from training.open_set import Outputs, collect_outputs
from training.recipes import InitArtifact, TrainConfig, starts_from_artifact


class FeatureBatches:
    """Shuffled mini-batches over cached features (N, D) and targets (N,), reshuffled from the per-epoch generator."""

    def __init__(self, feats: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool) -> None:
        self.feats, self.targets, self.batch_size, self.shuffle = feats, targets, batch_size, shuffle
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.targets)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.feats[idx], self.targets[idx]  # (B, D), (B,)


class Plan(ABC):
    """How a recipe trains `model`: the part that learns, the batches it sees, which ranks train it, and how the
    test split is scored at the end."""

    def __init__(self, model: ViT | ConvNet, trained: nn.Module, cfg: TrainConfig, env: Runtime) -> None:
        self.model, self.cfg, self.env = model, cfg, env
        self.trained = trained  # the part that learns: AdamW's parameters, the state and best-weights files
        self.step_module: nn.Module = trained  # what a training step calls (WholeNetwork: DDP-wrapped under torchrun)
        self.mixer: Mixer | None = None  # MixUp/CutMix with --mixup (whole-network recipes only)
        self.distillation: TeacherLoss | None = None  # the teacher's loss (Distillation only)
        self.steps_per_epoch = 0  # on this rank
        self.val_batches: Batches = ()
        # --init ARTIFACT: the artifact the backbone came from; its preprocessing is the run's eval view and the
        # trained artifact's (mean/std travel in the model's config).
        self.init = InitArtifact.read(cfg.init) if starts_from_artifact(cfg) else None
        self.policy = self.init.preprocessing if self.init else None

    @property
    def vit(self) -> ViT:
        """The model as the ViT it is for every plan but ConvNetTeacher, which overrides each method that reads this."""
        assert isinstance(self.model, ViT), f"{type(self).__name__} trains a ViT, not {type(self.model).__name__}"
        return self.model

    @property
    def image_size(self) -> int:
        """The side the train and held-out images are cropped to: the model's native size."""
        return self.vit.config.image_size

    @property
    def model_name(self) -> str:
        """The network's short name in the artifact's name and `variant` ("ti16", "b16", "resnet50")."""
        return self.cfg.variant

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one besides the recipe, variant, overrides and seed (the
        teacher, for a distillation; the starting artifact, with --init); stored in the resumable state, compared by
        training.loop.check_resumable."""
        return {"init_sha256": self.init.sha256} if self.init else {}

    def training_record(self) -> dict[str, Any]:
        """Entries this plan adds to the artifact's metadata.training (the teacher's identity, for a distillation;
        the starting artifact's, with --init)."""
        return {"init": self.init.identity()} if self.init else {}

    def write_artifact(self, out: str | Path, fields: dict[str, Any]) -> Path:
        """Save the model (on the CPU) with its metadata `fields` as the run's artifact; with --init, under the
        starting artifact's preprocessing policy."""
        model = self.vit.cpu()
        if self.policy is not None:
            fields = {**fields, "preprocessing": self.policy}
        return save_artifact(model, out, ArtifactMetadata.create(model.config, fields))

    def trust_outputs(self, splits: DataSplits) -> tuple[Outputs, Outputs] | None:
        """(train, val) logits and CLS features of the model as it now is, for calibration and the open set
        (training/open_set.py fit_trust); None for a network the service does not serve (a convnet teacher)."""
        model, env = self.vit, self.env
        views = [
            getattr(splits, name).with_transform(eval_transform(self.image_size, policy=self.policy))
            for name in ("train", "val")
        ]
        batch = max(16, self.cfg.batch_size)
        train, val = (
            collect_outputs(model, view, batch, env.device, env.workers, env.amp, desc=f"{name} outputs")
            for name, view in zip(("train", "val"), views, strict=True)
        )
        return train, val

    @abstractmethod
    def prepare(self, splits: DataSplits, data: DataConfig, run_dir: Path, with_test: bool) -> None:
        """Build the train and held-out batches (a probe also extracts the test features when with_test)."""

    @abstractmethod
    def epoch_runtime(self) -> Runtime | None:
        """The runtime the epochs run under on this rank; None when this rank trains nothing."""

    @abstractmethod
    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Batches:
        """The train batches of `epoch`, shuffled from its generator (training.loop.seed_epoch)."""

    @abstractmethod
    def test_logits(self, splits: DataSplits) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C) float32 on the CPU, targets (N,)) of the test split, by the model as it now is."""


class HeadOnFeatures(Plan):
    """linear-probe: the frozen backbone's CLS features once, then only model.head trains, on rank 0 alone."""

    def __init__(self, model: ViT, cfg: TrainConfig, env: Runtime) -> None:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        super().__init__(model, model.head, cfg, env)
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (feats (N, D), targets (N,))

    def prepare(self, splits: DataSplits, data: DataConfig, run_dir: Path, with_test: bool) -> None:
        if not self.env.info.is_main:
            return  # the other ranks train nothing: they wait for rank 0's artifact
        # Features once, on the deterministic eval view; every epoch after this is a few matrix multiplies.
        image_size = self.vit.config.image_size
        eval_tf = eval_transform(image_size, policy=self.policy)
        for name in ("train", "val", "test") if with_test else ("train", "val"):
            feats, targets, hit = cached_features(
                run_dir / "features",
                name,
                self.vit,
                getattr(splits, name).with_transform(eval_tf),
                {"image_size": image_size, "transform": "eval"},
                batch_size=max(16, self.cfg.batch_size // 4),
                device=self.env.device,
                num_workers=self.env.workers,
                autocast_dtype=self.env.amp,
            )
            self.features[name] = (feats.to(self.env.device), targets.to(self.env.device))
            print(f"{name} features {tuple(feats.shape)} ({'cache' if hit else 'extracted'})")
        self.train_batches = FeatureBatches(*self.features["train"], self.cfg.batch_size, shuffle=True)
        self.val_batches = FeatureBatches(*self.features["val"], 1024, shuffle=False)
        self.steps_per_epoch = len(self.train_batches)

    def epoch_runtime(self) -> Runtime | None:
        # The head is tiny: rank 0 trains it alone, with no collectives (a single-process runtime); the other
        # ranks skip the epochs and wait at the loop's barrier.
        return replace(self.env, info=DistInfo()) if self.env.info.is_main else None

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Batches:
        self.train_batches.generator = generator
        return self.train_batches

    @torch.no_grad()
    def trust_outputs(self, splits: DataSplits) -> tuple[Outputs, Outputs] | None:
        # The cached features are the CLS token after the final LayerNorm (forward_head's pre-logits of a ViT with
        # one head): the head over them gives the logits, no image runs through the backbone again.
        if self.vit.config.distilled:  # pre-logits would be the mean of two tokens, not the CLS token
            return super().trust_outputs(splits)
        return tuple(  # type: ignore[return-value]
            Outputs(self.vit.head(feats).float().cpu(), feats.float().cpu(), targets.cpu())
            for feats, targets in (self.features["train"], self.features["val"])
        )

    @torch.no_grad()
    def test_logits(self, splits: DataSplits) -> tuple[torch.Tensor, torch.Tensor]:
        # The head over the cached test features: the same numbers as the whole model over the test images.
        feats, targets = self.features["test"]
        return self.vit.head(feats).float().cpu(), targets.cpu()

    def write_artifact(self, out: str | Path, fields: dict[str, Any]) -> Path:
        # A distilled backbone (an imported DeiT) answers with (head(cls) + head_dist(dist)) / 2, and its features
        # are (cls + dist) / 2: with head_dist = head, that is exactly the head over the features the probe trained on.
        if self.vit.head_dist is not None:
            self.vit.head_dist.load_state_dict(self.vit.head.state_dict())
        return super().write_artifact(out, fields)


class WholeNetwork(Plan):
    """finetune and scratch: every weight trains on augmented images; DDP under torchrun."""

    def __init__(self, model: ViT, cfg: TrainConfig, env: Runtime) -> None:
        super().__init__(model, model, cfg, env)
        self.sampler: DistributedSampler | RandomSampler | None = None

    def step_target(self) -> nn.Module:
        """The module a step calls (DDP wraps it under torchrun): the model itself."""
        return self.model

    def prepare(self, splits: DataSplits, data: DataConfig, run_dir: Path, with_test: bool) -> None:
        cfg, env, info = self.cfg, self.env, self.env.info
        image_size = self.image_size
        train_view = splits.train.with_transform(
            train_transform(image_size, cfg.augment, data.hflip, data.min_crop_scale, policy=self.policy)
        )
        self.step_module = self.step_target()
        if info.enabled:
            self.sampler = DistributedSampler(train_view, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module, device_ids=device_ids)
        else:
            self.sampler = RandomSampler(train_view)
        self.train_loader = DataLoader(
            train_view,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=env.workers,
            pin_memory=env.device.type == "cuda",
            drop_last=len(train_view) > cfg.batch_size * info.world_size,  # steady batch statistics
            persistent_workers=False,
        )
        # Every world_size-th held-out item from rank on: the ranks split evaluation without padding.
        val_view = splits.val.with_transform(eval_transform(image_size, policy=self.policy))
        val_shard = Subset(val_view, range(info.rank, len(val_view), info.world_size))
        self.val_batches = DataLoader(val_shard, batch_size=cfg.batch_size)
        self.mixer = batch_mixer(len(splits.labels)) if cfg.mixup else None
        self.steps_per_epoch = len(self.train_loader)

    def epoch_runtime(self) -> Runtime | None:
        return self.env

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Batches:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)  # shuffles from (seed, epoch), the same permutation on every rank
        else:
            assert self.sampler is not None, "prepare() builds the sampler before the first epoch"
            self.sampler.generator = generator  # RandomSampler: the epoch's own stream, so resuming reshuffles alike
        return self.train_loader

    def test_logits(self, splits: DataSplits) -> tuple[torch.Tensor, torch.Tensor]:
        test_view = splits.test.with_transform(eval_transform(self.image_size, policy=self.policy))
        env = self.env
        return predict(self.model, test_view, self.cfg.batch_size, env.device, env.workers, env.amp, desc="test")


class Distillation(WholeNetwork):
    """distill (DeiT): a ViT with a distillation token trains like scratch; every step calls both its heads, and
    a frozen teacher (a petvit ViT artifact or a convnet teacher artifact, on this rank's device) answers the same
    augmented, mixed batch for the distillation head. Held-out and test scores are the averaged heads', as the
    model answers at inference."""

    def __init__(self, model: ViT, cfg: TrainConfig, env: Runtime) -> None:
        super().__init__(model, cfg, env)
        self.teacher = load_teacher(str(cfg.teacher), device=env.device)
        self.distillation = DistillationLoss(self.teacher.module, cfg.distill, cfg.distill_alpha, cfg.distill_tau)

    def step_target(self) -> nn.Module:
        return TwoHeads(self.vit)  # forward -> (CLS logits, distillation logits)

    def prepare(self, splits: DataSplits, data: DataConfig, run_dir: Path, with_test: bool) -> None:
        if self.teacher.labels != list(splits.labels):  # its class i must be ours, or its argmax teaches nonsense
            raise ValueError(
                f"the teacher {self.teacher.path} knows the classes {self.teacher.labels[:5]}... "
                f"({len(self.teacher.labels)}), this data has {list(splits.labels)[:5]}... ({len(splits.labels)}); "
                "train the teacher on the same dataset"
            )
        super().prepare(splits, data, run_dir, with_test)

    def settings(self) -> dict[str, Any]:
        return {
            "distill": self.cfg.distill,
            "distill_alpha": self.cfg.distill_alpha,
            "distill_tau": self.cfg.distill_tau,
        }

    def fingerprint(self) -> dict[str, Any]:
        return {"teacher_sha256": self.teacher.sha256, **self.settings()}

    def training_record(self) -> dict[str, Any]:
        return {"teacher": self.teacher.identity(), "distillation": self.settings()}


class ConvNetTeacher(WholeNetwork):
    """teacher: a torchvision convnet (ImageNet or random weights) trained whole like finetune, then written as a
    convnet teacher artifact (model/convert/teachers.py) for distill."""

    model: ConvNet

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def model_name(self) -> str:
        return self.model.arch

    def fingerprint(self) -> dict[str, Any]:
        return {"arch": self.cfg.arch, "init": self.cfg.init}

    def trust_outputs(self, splits: DataSplits) -> tuple[Outputs, Outputs] | None:
        return None  # a teacher is never served: no temperature, no open set

    def write_artifact(self, out: str | Path, fields: dict[str, Any]) -> Path:
        return save_convnet_artifact(self.model.cpu(), out, fields)


# Each plan takes the network its recipe builds (a ViT; a ConvNet for teacher), hence the loose argument types.
PLANS: dict[str, Callable[[Any, TrainConfig, Runtime], Plan]] = {
    "linear-probe": HeadOnFeatures,
    "finetune": WholeNetwork,
    "scratch": WholeNetwork,
    "distill": Distillation,
    "teacher": ConvNetTeacher,
}


def plan_for(model: ViT | ConvNet, cfg: TrainConfig, env: Runtime) -> Plan:
    """The plan of cfg.recipe over `model` (a linear probe freezes the backbone here, before the optimizer sees it)."""
    return PLANS[cfg.recipe](model, cfg, env)
