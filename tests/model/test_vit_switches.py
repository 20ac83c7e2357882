"""The ViTConfig switches CLIP's and DINOv2's towers need: each off by default (a plain ViT's document, state dict
and outputs unchanged), each computing its documented function when on, stored by the artifact only when set, and
refused when malformed. Their exactness against the source libraries is tested by the imports
(test_clip_import.py, test_dinov2_import.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.artifact import load_artifact, read_metadata, save_artifact
from model.config import ViTConfig
from model.rollout import attention_rollout
from model.vit import ViT, resample_position_embedding
from tests.conftest import make_tiny_config, make_tiny_model

SWITCHES = dict(pre_norm=True, activation="quick_gelu", layer_scale=True, projection_dim=16, normalize_features=True)


def test_defaults_keep_a_plain_vits_document_and_state_dict() -> None:
    config = make_tiny_config()
    assert not set(SWITCHES) & set(config.to_dict())  # the document petvit always wrote: feature-cache keys hold
    names = set(ViT(config).state_dict())
    assert not {n for n in names if n.startswith(("norm_pre", "feature_proj")) or ".ls" in n}
    assert config.feature_dim == config.hidden_dim


def test_switches_round_trip_through_an_artifact(tmp_path: Path) -> None:
    model = make_tiny_model(**SWITCHES)
    with torch.no_grad():  # away from the init, so a weight lost on the way shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    path = save_artifact(model, tmp_path / "switches.safetensors", {"name": "switches"})
    assert {k: read_metadata(path).config.to_dict()[k] for k in SWITCHES} == SWITCHES
    loaded, meta = load_artifact(path)
    assert meta.config == model.config
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_each_switch_computes_its_documented_function() -> None:
    model = make_tiny_model(**SWITCHES).eval()
    x = torch.randn(3, 32)
    assert torch.allclose(model.blocks[0].mlp.act(x), x * torch.sigmoid(1.702 * x))
    with torch.no_grad():
        model.blocks[0].ls1.gamma.copy_(torch.linspace(0.5, 2.0, 32))
        tokens = torch.randn(2, 17, 32)
        block = model.blocks[0]
        h = tokens + block.ls1.gamma * block.attn(block.norm1(tokens))[0]
        expected = h + block.ls2.gamma * block.mlp(block.norm2(h))
        assert torch.allclose(block(tokens)[0], expected, atol=1e-6)
        feature = model.forward_head(tokens, pre_logits=True)
        assert feature.shape == (2, 16)
        assert torch.allclose(feature, F.normalize(tokens[:, 0] @ model.feature_proj.weight.T, dim=-1), atol=1e-6)
        assert torch.allclose(feature.norm(dim=-1), torch.ones(2))
        images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
        embedded = model.embed(images)  # norm_pre's output: LayerNorm'd with its (initial) unit gain, zero bias
        assert torch.allclose(embedded.mean(-1), torch.zeros(1, 17), atol=1e-5)


def test_reset_head_reads_the_feature_width() -> None:
    model = make_tiny_model(projection_dim=16)
    model.reset_head(10)
    assert model.head.weight.shape == (10, 16) and model.config.num_classes == 10
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"activation": "relu"}, "activation must be one of"),
        ({"projection_dim": -1}, "projection_dim must be 0"),
        ({"layer_scale": "yes"}, "layer_scale must be true or false"),
        ({"distilled": True, "projection_dim": 8}, "distilled ViT's two heads"),
    ],
)
def test_malformed_switches_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)


def test_an_older_document_without_the_switches_reads_as_a_plain_vit() -> None:
    doc = make_tiny_config().to_dict()
    assert ViTConfig.from_dict(doc) == make_tiny_config()


def test_resampling_keeps_the_prefix_and_matches_timms_antialiased_rule() -> None:
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 37 * 37, 8)
    for antialias in (False, True):
        ours = resample_position_embedding(pos, 1, (16, 16), antialias=antialias)
        theirs = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1, antialias=antialias)
        assert ours.shape == (1, 257, 8) and torch.equal(ours[:, 0], pos[:, 0])
        assert torch.allclose(ours, theirs, atol=1e-6)
    plain = resample_position_embedding(pos, 1, (16, 16))
    smoothed = resample_position_embedding(pos, 1, (16, 16), antialias=True)
    assert (plain - smoothed).abs().max() > 0.1  # shrinking 37 -> 16: the two libraries' rules differ


def test_flops_count_the_projection() -> None:
    plain, projected = ViT(make_tiny_config()), ViT(make_tiny_config(projection_dim=16))
    extra = 2 * 32 * 16 - 2 * (32 - 16) * 37  # the projection, minus the narrower head
    assert math.isclose(projected.flops_per_image() - plain.flops_per_image(), extra)


@pytest.mark.parametrize(
    "switches",
    [
        dict(pre_norm=True, activation="quick_gelu", projection_dim=16, normalize_features=True),  # a CLIP tower
        dict(layer_scale=True),  # a DINOv2 backbone
    ],
    ids=["clip", "dinov2"],
)
def test_rollout_of_planted_attention_peaks_on_the_planted_patch_at_patch_14(switches: dict) -> None:
    """The towers' token layout at 14 px patches (CLS, then a 4 x 4 grid at 56 px): the attention the model returns
    has that shape, and attention planted on one patch in every block rolls out to a map that peaks exactly there."""
    model = make_tiny_model(patch_size=14, image_size=56, **switches).eval()
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        _, attentions = model.forward_with_attention(images)
    grid, tokens = model.check_input(images), model.num_prefix_tokens + 16
    assert grid == (4, 4) and [a.shape for a in attentions] == [(2, model.config.num_heads, tokens, tokens)] * len(
        attentions
    )
    for patch in (0, 6, 15):
        planted = torch.full_like(attentions[0], 0.1 / (tokens - 1))
        planted[..., model.num_prefix_tokens + patch] = 0.9  # every token looks at that patch
        heatmap = attention_rollout([planted] * len(attentions), num_prefix_tokens=model.num_prefix_tokens, grid=grid)
        assert heatmap.shape == (2, 4, 4)
        assert all(int(h.argmax()) == patch and h.flatten()[patch] == 1.0 for h in heatmap)
