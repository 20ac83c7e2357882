"""torchvision weights -> our ViT: conversion rules, the hub-cache path through torchvision's API, offline failure."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import ViT_B_16_Weights
from torchvision.models.vision_transformer import VisionTransformer

from model.config import IMAGENET_MEAN, IMAGENET_STD
from model.convert.pretrained import (
    PretrainedWeightsUnavailable,
    convert_torchvision_state_dict,
    from_torchvision,
    load_pretrained,
    weights_enum,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
B16_FILE = Path(ViT_B_16_Weights.IMAGENET1K_V1.url).name  # e.g. vit_b_16-c867db91.pth


def small_torchvision_vit(depth: int = 1, width: int = 768, heads: int = 12, patch: int = 16) -> VisionTransformer:
    """A torchvision ViT with b16's widths (depth cut) and random values everywhere, the head included."""
    torch.manual_seed(0)
    tv = VisionTransformer(224, patch, num_layers=depth, num_heads=heads, hidden_dim=width, mlp_dim=4 * width)
    with torch.no_grad():
        for p in (tv.class_token, tv.heads.head.weight, tv.heads.head.bias):
            p.normal_(std=0.05)
    return tv.eval()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, deterministically: torch.hub's downloader fails the way urllib does without a route."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def cache_b16_weights(torch_home: Path, tv: VisionTransformer) -> Path:
    """Place a torchvision-format state dict where torch.hub looks before downloading."""
    path = torch_home / "hub" / "checkpoints" / B16_FILE
    path.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    return path


def test_load_pretrained_reads_the_hub_cache_through_torchvision(torch_home: Path, offline: None) -> None:
    tv = small_torchvision_vit()
    cache_b16_weights(torch_home, tv)
    model = load_pretrained("vit_b_16").eval()
    assert model.config.depth == 1 and model.config.num_classes == 1000  # read off the file's tensor shapes
    assert model.config.num_heads == 12 and model.config.image_size == 224
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        expected = tv((images - MEAN) / STD)
        got = model(images)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.std() > 0.1


def test_load_pretrained_with_num_classes_replaces_the_head(torch_home: Path, offline: None) -> None:
    tv = small_torchvision_vit()
    cache_b16_weights(torch_home, tv)
    model = load_pretrained("b16", num_classes=37).eval()
    assert model.config.num_classes == 37
    assert model.head.weight.shape == (37, 768)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    images = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        patches = tv._process_input((images - MEAN) / STD)  # (B, N, D), as in torchvision's forward
        tv_features = tv.encoder(torch.cat([tv.class_token, patches], dim=1))[:, 0]  # CLS before the head
        ours = model.forward_head(model.forward_features(images), pre_logits=True)
    assert (ours - tv_features).abs().max().item() <= 1e-4  # the backbone kept its ImageNet weights


def test_load_pretrained_offline_names_the_file_and_the_cache_folder(torch_home: Path, offline: None) -> None:
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        load_pretrained("vit_b_16", num_classes=37)
    message = str(info.value)
    folder = torch_home / "hub" / "checkpoints"
    assert f"place it as {folder / B16_FILE}" in message
    assert ViT_B_16_Weights.IMAGENET1K_V1.url in message
    assert "ViT_B_16_Weights.IMAGENET1K_V1" in message
    assert "TORCH_HOME" in message


def test_weights_enum_picks_torchvision_entries_and_explains_bad_names() -> None:
    assert weights_enum("b16") is ViT_B_16_Weights.IMAGENET1K_V1
    assert weights_enum("vit_b_16", "IMAGENET1K_SWAG_LINEAR_V1") is ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1
    with pytest.raises(ValueError, match=r"no pretrained weights for variant 'ti16'.*'b16'"):
        weights_enum("ti16")
    with pytest.raises(ValueError, match=r"ViT_B_16_Weights has no member 'NOPE'; choose one of \['IMAGENET1K_V1'"):
        weights_enum("b16", "NOPE")


def test_convert_reads_the_architecture_from_tensor_shapes() -> None:
    tv = small_torchvision_vit(depth=3, width=384, heads=6, patch=32)
    config, converted = convert_torchvision_state_dict(tv.state_dict())
    assert (config.depth, config.hidden_dim, config.num_heads, config.patch_size) == (3, 384, 6, 32)
    assert (config.mlp_dim, config.image_size, config.num_classes) == (1536, 224, 1000)
    # nn.MultiheadAttention's stacked in_proj is our fused qkv, row for row.
    in_proj = tv.state_dict()["encoder.layers.encoder_layer_2.self_attention.in_proj_weight"]
    assert torch.equal(converted["blocks.2.attn.qkv.weight"], in_proj)
    # conv (D, C, P, P): output channel d, input channel c, pixel (i, j) -> column (i * P + j) * C + c.
    conv = tv.conv_proj.weight
    assert converted["patch_embed.weight"][5, (7 * 32 + 11) * 3 + 2] == conv[5, 2, 7, 11]


def test_convert_accepts_older_mlp_names_and_refuses_pre_logits() -> None:
    sd = small_torchvision_vit().state_dict()
    renamed = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in sd.items()
    }  # torchvision < 0.13
    _, old = convert_torchvision_state_dict(renamed)
    _, new = convert_torchvision_state_dict(sd)
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="representation_size"):
        convert_torchvision_state_dict({**sd, "heads.pre_logits.weight": torch.zeros(1)})


def test_from_torchvision_copies_weights_mode_and_dropout() -> None:
    tv = VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, dropout=0.1)
    ours = from_torchvision(tv.train())
    assert ours.training and ours.config.dropout == 0.1 and ours.config.num_heads == 2
    with torch.no_grad():
        ours.cls_token.add_(1.0)
    assert not torch.equal(ours.cls_token, tv.class_token)  # independent copies, not shared storage


@pytest.mark.parametrize("content", [b"<html>404</html>", b"PK\x03\x04truncated zip"])
def test_damaged_file_in_the_hub_cache_says_which_file_to_replace(torch_home: Path, content: bytes) -> None:
    path = torch_home / "hub" / "checkpoints" / B16_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)  # e.g. an error page saved under the weights' name, or a partial copy
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        load_pretrained("vit_b_16")  # was: torch.load's traceback, advising weights_only=False
    message = str(info.value)
    assert str(path) in message and "Delete it" in message and ViT_B_16_Weights.IMAGENET1K_V1.url in message
    assert "weights_only" not in message
