"""The training recipes as data: hyper-parameters per recipe, the model each starts from, the LR schedule.

finetune      whole ImageNet ViT-B/16 trained end to end (AdamW, warmup + cosine, label smoothing, clipping,
              bf16 autocast on CUDA): the GPU recipe behind published Pets accuracies.
linear-probe  frozen ImageNet backbone; CLS features extracted once and cached; only the head trains: the CPU
              recipe (one forward pass per image in total, then seconds per epoch).
scratch       a small ViT from random init with strong augmentation + MixUp/CutMix: ViTs lack convolutional
              priors, so without pre-training they need heavy regularisation (DeiT, Touvron et al. 2021).
distill       DeiT: scratch's recipe for a ViT with a distillation token, whose second head learns a frozen
              teacher's answers on every augmented (and mixed) batch (training/distill.py).
teacher       a torchvision convnet (resnet50, regnet_y_400mf, ...) trained like finetune, from ImageNet or random
              weights, written as a teacher artifact for distill (model/convert/teachers.py).

finetune and linear-probe start from torchvision's ImageNet ViT unless `init` names a petvit artifact (one that
`petvit import` made from a timm / Hugging Face checkpoint, or any other): then its backbone, with a new head for
the data's classes, and its preprocessing (mean/std in the config, resize and crop policy in InitArtifact).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.artifact import ArtifactMetadata, Preprocessing, file_sha256, load_artifact, read_metadata
from model.config import VARIANTS, canonical_variant, get_config
from model.convert.pretrained import load_pretrained
from model.convert.teachers import ConvNet, build_convnet, check_convnet_name
from model.vit import ViT
from training.data import AUGMENTATIONS
from training.distill import DISTILL_MODES

RECIPES = ("finetune", "linear-probe", "scratch", "distill", "teacher")
INITS = ("imagenet", "random")  # the teacher recipe's starting weights; finetune and linear-probe also take an artifact
INIT_RECIPES = ("finetune", "linear-probe")  # the recipes that start from a given artifact's backbone


@dataclass(frozen=True)
class TrainConfig:
    """What to train. A field with "help" metadata is a `petvit train` flag (cli/flags.py builds it); the flags
    parse to None when not given, so the recipe's defaults (RECIPE_DEFAULTS) apply."""

    recipe: str = field(
        default="finetune",
        metadata={
            "help": "auto: finetune on CUDA, linear-probe otherwise; distill: DeiT, a ViT with a distillation token "
            "taught by --teacher; teacher: a torchvision convnet (--arch) for distill",
            "choices": ("auto", *RECIPES),
            "default": "auto",  # the command resolves it by the device (training.loop.default_recipe)
        },
    )
    variant: str = field(
        default="b16", metadata={"help": "model variant (recipe default: b16, scratch and distill: ti16)"}
    )
    epochs: int = field(default=10, metadata={"help": "epochs to train"})
    batch_size: int = field(default=64, metadata={"help": "images per step on each rank"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})  # reached after the warmup
    min_lr: float = 1e-6  # cosine floor
    weight_decay: float = field(
        default=0.05,
        metadata={"help": "AdamW decoupled weight decay; not applied to biases, norms, embeddings, tokens"},
    )
    # linear warmup protects pretrained features from the new head's large gradients
    warmup_epochs: float = field(default=1.0, metadata={"help": "epochs of linear LR warmup (fractions allowed)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    augment: str = field(
        default="trivial",
        metadata={"help": "training augmentation (training.data.train_transform)", "choices": AUGMENTATIONS},
    )
    mixup: bool = field(default=False, metadata={"help": "MixUp/CutMix", "negatable": True})  # per batch, soft targets
    seed: int = field(
        default=0, metadata={"help": "training seed (the held-out split has its own, --split-seed)", "default": 0}
    )
    # ViTConfig field overrides on top of the variant (e.g. a tiny model for tests: depth=2, hidden_dim=32).
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "scratch, distill: override a ViTConfig field, e.g. --set depth=6 --set image_size=128 (teacher: "
            "image_size only)",
            "flag": "--set",
        },
    )
    # distill: the teacher artifact and DeiT's loss (training/distill.py).
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "distill: the teacher, a petvit ViT artifact or a convnet teacher artifact",
            "metavar": "ARTIFACT",
        },
    )
    distill: str = field(
        default="hard",
        metadata={
            "help": "distill: hard (the teacher's argmax; default) or soft (its tempered distribution)",
            "choices": DISTILL_MODES,
        },
    )
    distill_tau: float = field(default=3.0, metadata={"help": "distill: soft distillation's temperature (default 3)"})
    distill_alpha: float = field(default=0.5, metadata={"help": "distill: the teacher term's weight (default 0.5)"})
    # teacher: which torchvision convnet, from which weights.
    arch: str | None = field(
        default=None,
        metadata={"help": "teacher: a torchvision convnet, e.g. resnet18, resnet50, regnet_y_400mf (default resnet50)"},
    )
    # teacher: "imagenet" or "random"; finetune / linear-probe: "imagenet" or the path of a petvit artifact to start
    # from (its backbone, a new head).
    init: str = field(
        default="imagenet",
        metadata={
            "help": "finetune, linear-probe: start from this petvit artifact's backbone (e.g. one `petvit import` "
            "wrote) with a new head, keeping its preprocessing; teacher: torchvision's ImageNet weights (default) "
            "or random ones",
            "metavar": "ARTIFACT|" + "|".join(INITS),
        },
    )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCRATCH = TrainConfig(
    recipe="scratch",
    variant="ti16",
    epochs=100,
    batch_size=128,
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=5.0,
    augment="randaugment",
    mixup=True,
)

RECIPE_DEFAULTS: dict[str, TrainConfig] = {
    # Fine-tuning at batch 64: lr 1e-4 is the usual AdamW transfer LR for ViT-B (timm / HF fine-tunes).
    "finetune": TrainConfig(recipe="finetune"),
    # Only a 768 x 37 linear layer trains, on cached features: large LR, many cheap epochs, no augmentation
    # (features are extracted once with the deterministic eval transform).
    "linear-probe": TrainConfig(
        recipe="linear-probe",
        epochs=50,
        batch_size=256,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_epochs=0.0,
        label_smoothing=0.0,
        grad_clip=0.0,
        augment="none",
    ),
    # DeiT-Tiny shape from random init: long schedule, strong augmentation and mixing.
    "scratch": _SCRATCH,
    # DeiT: scratch's schedule and regularisation; the distillation head learns the teacher's argmax (hard), the
    # setting with which DeiT-Ti/S beat their teacher-less selves on ImageNet.
    "distill": _SCRATCH.replace(recipe="distill", distill="hard"),
    # A convnet teacher fine-tuned from ImageNet: finetune's schedule, a larger LR (convnets with batch norm take
    # it), no MixUp so the teacher's answers stay sharp.
    "teacher": TrainConfig(recipe="teacher", epochs=10, batch_size=64, lr=1e-3, arch="resnet50", init="imagenet"),
}


def recipe_config(recipe: str, **overrides: Any) -> TrainConfig:
    """The recipe's defaults with any non-None override applied. With an artifact as `init`, the variant is the
    artifact's (its architecture is what the run trains)."""
    if recipe not in RECIPE_DEFAULTS:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = RECIPE_DEFAULTS[recipe].replace(**given)
    check_recipe_settings(cfg)
    if starts_from_artifact(cfg):
        if "variant" in given:
            raise ValueError(f"--variant does not apply with --init {cfg.init}: the architecture is the artifact's")
        cfg = cfg.replace(variant=read_metadata(cfg.init).variant or "custom")
    return cfg


def starts_from_artifact(cfg: TrainConfig) -> bool:
    """Whether `init` names an artifact to start from (anything but "imagenet" / "random")."""
    return cfg.init not in INITS


@dataclass(frozen=True)
class InitArtifact:
    """The artifact a finetune or linear probe starts from: its metadata (the preprocessing the run keeps) and
    identity (for the trained artifact's record and for --resume)."""

    path: str
    sha256: str
    meta: ArtifactMetadata

    @classmethod
    def read(cls, path: str) -> InitArtifact:
        return cls(path, file_sha256(path), read_metadata(path))

    @property
    def preprocessing(self) -> Preprocessing:
        return self.meta.preprocessing

    def identity(self) -> dict[str, Any]:
        source = (
            self.meta.provenance.get("repo") or self.meta.provenance.get("folder") or self.meta.training.get("source")
        )
        return {"artifact": self.path, "sha256": self.sha256, "name": self.meta.name, "source": source}


def check_recipe_settings(cfg: TrainConfig) -> None:
    """Refuse settings the recipe would ignore or cannot run with, before any data or weights are read."""
    if cfg.recipe == "distill":
        if not cfg.teacher:
            raise ValueError("--recipe distill needs --teacher ARTIFACT (a petvit ViT or a convnet teacher artifact)")
        if cfg.distill not in DISTILL_MODES:
            raise ValueError(f"--distill must be one of {DISTILL_MODES}, got {cfg.distill!r}")
    elif cfg.teacher:
        raise ValueError(f"--teacher applies to --recipe distill only, not {cfg.recipe}")
    if starts_from_artifact(cfg):
        if cfg.recipe not in INIT_RECIPES:
            raise ValueError(
                f"--init ARTIFACT starts {' or '.join(INIT_RECIPES)} from an artifact's backbone, not {cfg.recipe}"
                + (f" (teacher: --init {' or '.join(INITS)})" if cfg.recipe == "teacher" else "")
            )
        if not Path(cfg.init).is_file():
            raise ValueError(f"--init {cfg.init}: no such artifact (make one with `petvit import` or `petvit train`)")
        if cfg.model_overrides:
            raise ValueError(f"--set does not apply with --init {cfg.init}: the architecture is the artifact's")
    if cfg.recipe == "teacher":
        check_convnet_name(cfg.arch or "")
        if set(cfg.model_overrides) - {"image_size"}:
            raise ValueError(f"--recipe teacher takes only --set image_size=N, not {cfg.model_overrides}")
    elif cfg.arch:
        raise ValueError(f"--arch applies to --recipe teacher only, not {cfg.recipe}")


def build_model(config: TrainConfig, num_classes: int) -> ViT | ConvNet:
    """The recipe's starting model: ImageNet weights with a fresh head, random init for scratch (distill: with a
    distillation token), or a torchvision convnet for a teacher."""
    if config.recipe == "teacher":
        torch.manual_seed(config.seed)  # the random init (the new head, at least) is part of what a seed repeats
        image_size = int(config.model_overrides.get("image_size", 224))
        return build_convnet(str(config.arch), num_classes, config.init, image_size)
    if starts_from_artifact(config):
        return model_from_artifact(config.init, num_classes)
    variant = canonical_variant(config.variant)
    if config.recipe in ("scratch", "distill"):
        torch.manual_seed(config.seed)  # random init is part of what a seed makes repeatable
        distilled = {"distilled": True} if config.recipe == "distill" else {}
        return ViT(get_config(variant, num_classes=num_classes, **{**config.model_overrides, **distilled}))
    if VARIANTS[variant].torchvision_builder is None:
        raise ValueError(
            f"recipe {config.recipe} needs ImageNet weights, which torchvision has only for "
            f"{sorted(k for k, v in VARIANTS.items() if v.torchvision_builder)}; use --recipe scratch for {variant}"
        )
    if config.model_overrides:
        # The architecture of a pretrained model is whatever the weights file holds. Checked before loading:
        # a bad flag should not cost a ViT-B download first.
        raise ValueError(
            f"model overrides ({config.model_overrides}) apply to --recipe scratch only (and to distill's student)"
        )
    return load_pretrained(variant, num_classes=num_classes)  # a fresh num_classes head on the ImageNet backbone


def model_from_artifact(path: str, num_classes: int) -> ViT:
    """The artifact's ViT with fresh zero-initialised head(s) for num_classes: its backbone starts the run."""
    model, _ = load_artifact(path)
    model.reset_head(num_classes)
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only; biases, norm gains, the cls and distillation tokens and pos_embed are
    left alone."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(("cls_token", "dist_token", "pos_embed")) else decay).append(
            param
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` at total_steps. A pure function of the step, so a
    resumed run needs no scheduler state to land on the same LR."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
