"""`petvit export`: write an artifact of any variant, untrained (benchmarks, smoke tests) or ImageNet-initialised."""

from __future__ import annotations

from pathlib import Path

import torch

from model.artifact import save_artifact
from model.config import VARIANTS, canonical_variant, get_config
from model.convert.pretrained import load_pretrained
from model.labels import NUM_PET_CLASSES
from model.vit import ViT


def export_artifact(
    variant: str, out: str | Path, init: str = "random", num_classes: int = NUM_PET_CLASSES, seed: int = 0
) -> Path:
    """Build `variant` with random or ImageNet weights and a fresh num_classes head; save it as an artifact."""
    key = canonical_variant(variant)
    if init == "random":
        # Seed a private RNG stream so the artifact is reproducible without reseeding the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ViT(get_config(key, num_classes=num_classes))
        source = f"random init (seed {seed})"
    elif init == "imagenet":
        model = load_pretrained(key, num_classes=num_classes)
        source = f"torchvision {VARIANTS[key].torchvision_builder} {VARIANTS[key].default_weights}, new head"
    else:
        raise ValueError(f"init must be 'random' or 'imagenet', got {init!r}")
    # A new head is untrained either way: the service must not present these predictions as meaningful.
    return save_artifact(
        model,
        out,
        {"name": f"petvit-{key}-{init}", "variant": key, "trained": False, "provenance": {"source": source}},
    )
