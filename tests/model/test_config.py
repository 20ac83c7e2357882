"""ViTConfig validation and serialisation, and the variant table against torchvision's own builders."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torchvision.models.vision_transformer as tv_vit

from model.config import VARIANTS, ViTConfig, canonical_variant, get_config
from model.convert.pretrained import weights_enum


def test_derived_sizes() -> None:
    config = get_config("b32")
    assert (config.grid_size, config.num_patches, config.head_dim) == (7, 49, 64)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 100}, "image_size 100 is not a multiple of patch_size 16"),
        ({"num_heads": 5}, "hidden_dim 768 does not divide into 5 heads"),
        ({"mean": (0.5, 0.5)}, r"mean and std need 3 values each"),
        ({"num_classes": 0}, "num_classes must be at least 1, got 0"),
        # were ZeroDivisionError / silently accepted (--set patch_size=0 ended in a traceback)
        ({"patch_size": 0}, "patch_size must be a positive integer, got 0"),
        ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
        ({"depth": 0}, "depth must be a positive integer, got 0"),
        ({"image_size": 224.0}, "image_size must be a positive integer, got 224.0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
    ],
)
def test_invalid_configs_say_what_is_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_config("b16", **changes)


def test_dict_round_trip_through_json() -> None:
    config = get_config("s16", num_classes=37, dropout=0.1)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["mean"] == list(config.mean)
    assert ViTConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['width'\]"):
        ViTConfig.from_dict({**data, "width": 3})


@pytest.mark.parametrize("name", ["b16", "vit_b_16", "ViT-B/16", "VIT_B_16", "B16"])
def test_variant_name_spellings(name: str) -> None:
    assert canonical_variant(name) == "b16"


def test_unknown_variant_lists_the_choices() -> None:
    with pytest.raises(KeyError, match=r"unknown ViT variant 'b8'; choose one of \['b16', 'b32', 'h14', 'l16'"):
        get_config("b8")


@pytest.mark.parametrize("key", [k for k, v in VARIANTS.items() if v.torchvision_builder])
def test_variant_table_matches_torchvision_builders(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Call torchvision's builder with its private constructor intercepted: its arguments are the ground truth."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(tv_vit, "_vision_transformer", lambda **kwargs: seen.update(kwargs))
    getattr(tv_vit, VARIANTS[key].torchvision_builder)()
    config = VARIANTS[key].config
    assert (config.patch_size, config.depth, config.num_heads) == (
        seen["patch_size"],
        seen["num_layers"],
        seen["num_heads"],
    )
    assert (config.hidden_dim, config.mlp_dim) == (seen["hidden_dim"], seen["mlp_dim"])
    entry = weights_enum(key)
    if key != "h14":  # torchvision ships H/14 only as SWAG weights at 518 px; load_pretrained reads that size
        assert entry.meta["min_size"] == (config.image_size, config.image_size)


def test_small_variants_follow_deit() -> None:
    ti, s = get_config("ti16"), get_config("s16")
    assert (ti.hidden_dim, ti.num_heads, ti.depth, ti.mlp_dim) == (192, 3, 12, 768)
    assert (s.hidden_dim, s.num_heads, s.depth, s.mlp_dim) == (384, 6, 12, 1536)
