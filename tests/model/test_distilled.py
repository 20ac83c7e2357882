"""The distillation token (DeiT): its parameters, both heads, averaged inference, position-embedding resampling,
rollout of either special token's row, the config and artifact round trips, and old artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model.artifact import load_artifact, read_metadata, save_artifact
from model.config import ViTConfig, get_config
from model.rollout import attention_rollout, discard_lowest, gradient_rollout, rollout_matrix
from model.vit import ViT
from tests.conftest import make_tiny_config, make_tiny_model


def make_distilled(seed: int = 0, **overrides) -> ViT:
    """The tiny model with a distillation token; both heads and both tokens random, and apart."""
    model = make_tiny_model(seed, distilled=True, **overrides)
    with torch.no_grad():
        model.head_dist.weight.normal_(std=0.5)
        model.head_dist.bias.normal_(std=0.5)
        model.cls_token.normal_(std=0.5)
        model.dist_token.normal_(std=0.5)
    return model.eval()


def test_distillation_token_position_row_and_head() -> None:
    model = make_distilled()
    D, N = 32, 16
    assert model.num_prefix_tokens == 2 and model.config.num_prefix_tokens == 2
    assert model.dist_token.shape == model.cls_token.shape == (1, 1, D)
    assert model.pos_embed.shape == (1, 2 + N, D)
    assert model.head_dist.weight.shape == model.head.weight.shape == (37, D)
    assert model.head_dist.bias.shape == (37,)
    extra = set(model.state_dict()) - set(make_tiny_model().state_dict())
    assert extra == {"dist_token", "head_dist.weight", "head_dist.bias"}
    plain = make_tiny_model()
    assert plain.num_prefix_tokens == 1 and plain.dist_token is None and plain.head_dist is None


def test_fresh_distilled_model_initialises_like_deit() -> None:
    torch.manual_seed(0)
    model = ViT(get_config("ti16", depth=1, distilled=True))
    assert 0.01 < model.dist_token.std().item() < 0.03  # trunc_normal(std=0.02): apart from CLS from the start
    assert model.cls_token.abs().max().item() < 1e-4
    assert torch.count_nonzero(model.head_dist.weight) == 0 and torch.count_nonzero(model.head.weight) == 0


def test_training_gets_both_heads_and_inference_their_mean() -> None:
    model = make_distilled()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)  # (3, 2 + 16, 32)
        cls_logits, dist_logits = model.forward_train(images)
        logits = model(images)
    assert tokens.shape == (3, 18, 32)
    torch.testing.assert_close(cls_logits, model.head(tokens[:, 0]))
    torch.testing.assert_close(dist_logits, model.head_dist(tokens[:, 1]))
    assert (cls_logits - dist_logits).abs().max() > 0.1  # two different heads, so the mean is a real check
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), (tokens[:, 0] + tokens[:, 1]) / 2)
    with pytest.raises(ValueError, match="needs a distilled model"):
        make_tiny_model().forward_train(images)


def test_explicit_attention_path_gives_the_same_averaged_logits() -> None:
    model = make_distilled()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(images)
        torch.testing.assert_close(logits, model(images), atol=1e-5, rtol=1e-5)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 18, 18)


def test_resampling_keeps_both_special_rows_and_resamples_the_patches_alone() -> None:
    model, plain = make_distilled(), make_tiny_model()
    with torch.no_grad():
        plain.pos_embed[:, 1:] = model.pos_embed[:, 2:]  # the same patch rows in a one-token model
    pos = model.position_embedding((7, 10))
    assert pos.shape == (1, 2 + 70, 32)
    assert torch.equal(pos[:, :2], model.pos_embed[:, :2])  # CLS and distillation rows untouched
    torch.testing.assert_close(pos[:, 2:], plain.position_embedding((7, 10))[:, 1:])
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(torch.rand(1, 3, 56, 80))  # a 7 x 10 grid end to end
    assert logits.shape == (1, 37) and attentions[0].shape == (1, 2, 72, 72)


def planted_attention(T: int, prefix: int, row: int, patch: int) -> list[torch.Tensor]:
    """One layer where every token attends to itself, except `row`, which attends to one patch only."""
    attention = torch.eye(T).expand(1, 1, T, T).clone()
    attention[0, 0, row] = 0.0
    attention[0, 0, row, prefix + patch] = 1.0
    return [attention]


def test_rollout_reads_the_cls_row_by_default_and_the_distillation_row_on_request() -> None:
    T = 2 + 16
    cls_looks = planted_attention(T, prefix=2, row=0, patch=5)
    dist_looks = planted_attention(T, prefix=2, row=1, patch=11)
    for attentions, token, patch in ((cls_looks, 0, 5), (dist_looks, 1, 11)):
        heatmap = attention_rollout(attentions, num_prefix_tokens=2, token=token)
        assert heatmap.shape == (1, 4, 4)
        assert heatmap.flatten().argmax().item() == patch and heatmap.max().item() == 1.0
    # The other token's row is not what the default reads: CLS looked nowhere in dist_looks.
    assert attention_rollout(dist_looks, num_prefix_tokens=2).flatten().argmax().item() != 11


def test_the_other_special_token_is_never_part_of_the_grid() -> None:
    """CLS attends only to the distillation token: a map that took column 1 for a patch would light a cell."""
    T = 2 + 16
    attention = torch.eye(T).expand(1, 1, T, T).clone()
    attention[0, 0, 0] = 0.0
    attention[0, 0, 0, 1] = 1.0
    grid = attention_rollout([attention], num_prefix_tokens=2)
    assert torch.count_nonzero(grid) == 0 and grid.shape == (1, 4, 4)
    # The predictor's call: the grid given, two special tokens follow from it.
    torch.testing.assert_close(attention_rollout([attention], grid=(4, 4)), grid)
    with pytest.raises(ValueError, match=r"17 patches are not a square grid.*num_prefix_tokens=2"):
        attention_rollout([attention])  # without either, one special token is assumed
    with pytest.raises(ValueError, match="token 2 is not one of the 2 special tokens"):
        attention_rollout([attention], grid=(4, 4), token=2)


def test_rollout_of_a_distilled_model_equals_the_matrix_rows() -> None:
    model = make_distilled()
    with torch.no_grad():
        _, attentions = model.forward_with_attention(torch.rand(2, 3, 32, 32))
    flow = rollout_matrix(attentions, num_prefix_tokens=2)  # (2, 18, 18)
    for token in (0, 1):
        expected = flow[:, token, 2:] / flow[:, token, 2:].amax(dim=-1, keepdim=True)
        got = attention_rollout(attentions, grid=(4, 4), token=token)
        torch.testing.assert_close(got, expected.reshape(2, 4, 4))
    cls_map, dist_map = (attention_rollout(attentions, grid=(4, 4), token=token) for token in (0, 1))
    assert not torch.allclose(cls_map, dist_map)


def test_discard_keeps_both_special_columns() -> None:
    attention = torch.full((1, 6, 6), 0.1)  # 2 special tokens + 4 patches, all equally weak
    attention[..., 2] = 0.5
    dropped = discard_lowest(attention, 0.5, num_prefix_tokens=2)  # int(4 * 0.5) = 2 patch columns per row
    assert torch.equal(dropped[..., :2], attention[..., :2])
    assert torch.count_nonzero(dropped[..., 2:], dim=-1).tolist() == [[2] * 6]


def test_gradient_rollout_reads_either_token() -> None:
    model = make_distilled()
    images = torch.rand(1, 3, 32, 32)
    logits, attentions = model.forward_with_attention(images)
    gradients = torch.autograd.grad(logits[:, 3].sum(), attentions)
    cls_map = gradient_rollout(attentions, gradients, grid=(4, 4))
    dist_map = gradient_rollout(attentions, gradients, grid=(4, 4), token=1)
    assert cls_map.shape == dist_map.shape == (1, 4, 4)
    assert cls_map.max().item() == pytest.approx(1.0) and not torch.allclose(cls_map, dist_map)


def test_reset_head_replaces_both_heads() -> None:
    model = make_distilled()
    model.reset_head(5)
    assert model.head.weight.shape == model.head_dist.weight.shape == (5, 32)
    with torch.no_grad():
        assert torch.count_nonzero(model(torch.rand(1, 3, 32, 32))) == 0


def test_flops_count_both_heads() -> None:
    model = make_distilled()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.forward_with_attention(torch.rand(1, 3, 32, 32))
    assert model.flops_per_image() == counter.get_total_flops()
    assert model.flops_per_image() > make_tiny_model().flops_per_image()


def test_config_stores_distilled_only_when_set_and_old_configs_read_as_plain() -> None:
    plain = make_tiny_config()
    assert "distilled" not in plain.to_dict()  # the document petvit always wrote: older releases still read it
    distilled = plain.replace(distilled=True)
    data = json.loads(json.dumps(distilled.to_dict()))
    assert data["distilled"] is True and ViTConfig.from_dict(data) == distilled
    assert ViTConfig.from_dict(plain.to_dict()).distilled is False
    with pytest.raises(ValueError, match="distilled must be true or false, got 'yes'"):
        plain.replace(distilled="yes")


def test_distilled_artifact_round_trips_bit_exact(tmp_path: Path) -> None:
    model = make_distilled()
    path = save_artifact(model, tmp_path / "d.safetensors", {"name": "d", "variant": "tiny"})
    loaded, meta = load_artifact(path)
    assert meta.config.distilled is True and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert read_metadata(path).config.num_prefix_tokens == 2


def test_an_old_artifact_without_the_key_loads_as_plain(tiny_artifact: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_artifact), framework="pt") as f:
        stored = json.loads(f.metadata()["petvit"])["config"]
    assert "distilled" not in stored
    model, meta = load_artifact(tiny_artifact)
    assert meta.config.distilled is False and model.head_dist is None and model.pos_embed.shape[1] == 17


def test_distilled_model_trains_both_heads_from_one_loss() -> None:
    model = make_distilled().train()
    cls_logits, dist_logits = model.forward_train(torch.rand(4, 3, 32, 32))
    target = torch.tensor([0, 1, 2, 3])
    (F.cross_entropy(cls_logits, target) + F.cross_entropy(dist_logits, target)).backward()
    for name in ("cls_token", "dist_token", "head.weight", "head_dist.weight", "pos_embed"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
