"""Attention rollout on hand-built attention, where the right answer is known, and on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from model.rollout import (
    attention_rollout,
    discard_lowest,
    fuse_heads,
    gradient_rollout,
    rollout_matrix,
    upsample_heatmap,
)
from tests.conftest import make_tiny_model


def random_attention(batch: int, heads: int, tokens: int, layers: int, seed: int = 0) -> list[torch.Tensor]:
    """Softmax-normalised random attention, (batch, heads, tokens, tokens) per layer."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=gen).mul(2).softmax(-1) for _ in range(layers)]


def planted(tokens: int, source: int, batch: int = 1, heads: int = 2, strength: float = 0.9) -> torch.Tensor:
    """Every token sends `strength` of its attention to token `source`, the rest spread evenly."""
    attention = torch.full((batch, heads, tokens, tokens), (1 - strength) / (tokens - 1))
    attention[..., source] = strength
    return attention


@pytest.mark.parametrize(("fusion", "ratio"), [("mean", 0.0), ("mean", 0.5), ("max", 0.0), ("min", 0.3)])
def test_rolled_out_rows_sum_to_one(fusion: str, ratio: float) -> None:
    rolled = rollout_matrix(random_attention(2, 3, 17, layers=4), head_fusion=fusion, discard_ratio=ratio)
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, 17))
    assert not torch.allclose(rolled.sum(-2), torch.ones(2, 17))  # columns are not distributions


@pytest.mark.parametrize(("fusion", "ratio"), [("mean", 0.0), ("max", 0.5), ("min", 0.9)])
def test_the_cls_row_carried_down_equals_the_full_products_row(fusion: str, ratio: float) -> None:
    """attention_rollout propagates only the CLS row (a vector per block); it must be rollout_matrix's row 0."""
    attentions = random_attention(3, 4, 50, layers=5, seed=2)
    rolled = rollout_matrix(attentions, head_fusion=fusion, discard_ratio=ratio)[:, 0, 1:]  # (B, 49)
    expected = rolled / rolled.amax(dim=-1, keepdim=True)
    got = attention_rollout(attentions, head_fusion=fusion, discard_ratio=ratio)
    torch.testing.assert_close(got, expected.reshape(3, 7, 7), atol=1e-6, rtol=1e-5)


def test_rows_not_columns_are_renormalised() -> None:
    """One layer, by hand: (A + I) divided by its row sums.

    The rows of A + I sum to 2, 1.2 and 2 (as after max fusion or discarding), so dividing by the column sums,
    or by a (T,) vector of row sums broadcast over the columns, would give a different matrix.
    """
    attention = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 1.0]])  # (T, T), T = 3
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rolled = rollout_matrix([attention.expand(1, 1, 3, 3)])
    torch.testing.assert_close(rolled[0], expected)


def test_identity_attention_gives_a_uniform_zero_map() -> None:
    """Tokens that only attend to themselves carry nothing from the patches to CLS: no patch stands out."""
    identity = torch.eye(17).expand(2, 3, 17, 17)
    heatmap = attention_rollout([identity, identity])
    assert heatmap.shape == (2, 4, 4)
    assert torch.count_nonzero(heatmap) == 0


def test_uniform_attention_gives_a_uniform_full_map() -> None:
    uniform = torch.full((1, 2, 17, 17), 1 / 17)
    heatmap = attention_rollout([uniform] * 3)
    torch.testing.assert_close(heatmap, torch.ones(1, 4, 4))


@pytest.mark.parametrize(("grid", "patch"), [((4, 4), 5), ((7, 10), 43), ((7, 10), 0), ((7, 10), 69)])
def test_attention_planted_on_a_patch_peaks_there(grid: tuple[int, int], patch: int) -> None:
    tokens = 1 + grid[0] * grid[1]
    heatmap = attention_rollout([planted(tokens, 1 + patch)] * 3, grid=grid)
    assert heatmap.shape == (1, *grid)
    row, col = divmod(int(heatmap[0].argmax()), grid[1])
    assert (row, col) == divmod(patch, grid[1])
    assert heatmap[0, row, col] == 1.0  # scaled by its maximum
    assert heatmap.min() >= 0.0


def test_batch_equals_per_image() -> None:
    attentions = random_attention(4, 3, 71, layers=3)
    batched = attention_rollout(attentions, discard_ratio=0.3, grid=(7, 10))
    for i in range(4):
        single = attention_rollout([a[i : i + 1] for a in attentions], discard_ratio=0.3, grid=(7, 10))
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # the images really differ


@pytest.mark.parametrize(("ratio", "dropped"), [(0.0, 0), (0.25, 17), (0.5, 35), (0.9, 63)])
def test_discard_ratio_zeroes_the_documented_count_per_row(ratio: float, dropped: int) -> None:
    """int(N * ratio) of each row's N = 70 patch weights, always the lowest; the CLS column is never touched."""
    attention = random_attention(2, 1, 71, layers=1)[0][:, 0]  # (B, T, T), strictly positive
    kept = discard_lowest(attention, ratio)
    assert torch.equal(kept[..., 0], attention[..., 0])
    zeroed = kept[..., 1:] == 0
    assert zeroed.sum(-1).eq(dropped).all()
    if dropped:
        # Every zeroed weight was below every surviving one in its row.
        patches = attention[..., 1:]
        highest_dropped = patches.masked_fill(~zeroed, -1).amax(-1)
        lowest_kept = patches.masked_fill(zeroed, 2).amin(-1)
        assert (highest_dropped < lowest_kept).all()
    survivors = ~zeroed
    assert torch.equal(kept[..., 1:][survivors], attention[..., 1:][survivors])


def test_discard_ratio_is_checked() -> None:
    with pytest.raises(ValueError, match=r"discard_ratio must be in \[0, 1\), got 1.0"):
        attention_rollout(random_attention(1, 1, 17, 1), discard_ratio=1.0)


def test_discard_ratio_sharpens_a_map_with_background_noise() -> None:
    attention = planted(17, 1 + 6, strength=0.3)  # a weak peak over an even background
    plain = attention_rollout([attention] * 2)
    sharp = attention_rollout([attention] * 2, discard_ratio=0.9)
    assert plain[0].flatten().argmax() == sharp[0].flatten().argmax() == 6
    assert sharp.mean() < plain.mean()


def test_head_fusions() -> None:
    heads = torch.tensor([[0.2, 0.8], [0.6, 0.4]]).view(1, 2, 1, 2)  # two heads, one query, two sources
    assert torch.equal(fuse_heads(heads, "mean"), torch.tensor([[[0.4, 0.6]]]))
    assert torch.equal(fuse_heads(heads, "max"), torch.tensor([[[0.6, 0.8]]]))
    assert torch.equal(fuse_heads(heads, "min"), torch.tensor([[[0.2, 0.4]]]))
    with pytest.raises(ValueError, match=r"head_fusion must be 'mean', 'max' or 'min', got 'median'"):
        fuse_heads(heads, "median")  # type: ignore[arg-type]


def test_head_fusion_changes_the_map() -> None:
    """Head 0 looks at patch 2 only, head 1 at patch 9 only: mean and max see both, min sees neither."""
    one_hot = torch.zeros(1, 2, 17, 17)
    one_hot[:, 0, :, 1 + 2] = 1.0
    one_hot[:, 1, :, 1 + 9] = 1.0
    for fusion in ("mean", "max"):
        heatmap = attention_rollout([one_hot], head_fusion=fusion)[0].flatten()
        assert set(torch.nonzero(heatmap == 1.0).flatten().tolist()) == {2, 9}
    assert torch.count_nonzero(attention_rollout([one_hot], head_fusion="min")) == 0


def test_grid_must_be_given_for_non_square_and_must_fit() -> None:
    attentions = random_attention(1, 1, 71, 1)
    with pytest.raises(ValueError, match=r"70 patches are not a square grid; pass grid=\(rows, cols\)"):
        attention_rollout(attentions)
    with pytest.raises(ValueError, match=r"grid \(7, 9\) holds 63 patches, attention covers 70"):
        attention_rollout(attentions, grid=(7, 9))
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])


def test_upsample_heatmap_shape_and_range() -> None:
    grid = torch.zeros(2, 7, 10)
    grid[0, 3, 8] = 1.0
    up = upsample_heatmap(grid, (56, 80))
    assert up.shape == (2, 56, 80)
    assert up.min() >= 0.0 and up.max() <= 1.0
    row, col = divmod(int(up[0].argmax()), 80)
    assert (row // 8, col // 8) == (3, 8)  # the peak stays in its patch
    assert upsample_heatmap(grid[0], (300, 451)).shape == (300, 451)  # 2-D in, 2-D out


def test_rollout_of_a_real_model() -> None:
    model = make_tiny_model()
    with torch.no_grad():
        _, attentions = model.forward_with_attention(torch.rand(2, 3, 56, 80))
    heatmap = attention_rollout(attentions, grid=(7, 10))
    assert heatmap.shape == (2, 7, 10)
    assert heatmap.min() >= 0.0 and heatmap.amax(dim=(1, 2)).eq(1.0).all()


def test_gradient_rollout_follows_its_rule_with_full_matrices() -> None:
    """R <- R + mean_heads(relu(grad * A)) @ R from R = I, written out over whole (T, T) matrices; gradient_rollout
    carries only the CLS row and must give that row."""
    attentions = random_attention(2, 3, 17, layers=4, seed=5)
    generator = torch.Generator().manual_seed(6)
    gradients = [torch.randn(a.shape, generator=generator) for a in attentions]
    relevance = torch.eye(17).expand(2, 17, 17)
    for attention, grad in zip(attentions, gradients, strict=True):
        relevance = relevance + (grad * attention).clamp_min(0).mean(dim=1) @ relevance
    row = relevance[:, 0, 1:]
    expected = (row / row.amax(dim=-1, keepdim=True)).reshape(2, 4, 4)
    torch.testing.assert_close(gradient_rollout(attentions, gradients), expected, atol=1e-6, rtol=1e-5)


def test_gradient_rollout_is_class_specific() -> None:
    model = make_tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = []
    for target in (0, 1):
        logits, attentions = model.forward_with_attention(images)
        gradients = torch.autograd.grad(logits[:, target].sum(), attentions)
        maps.append(gradient_rollout([a.detach() for a in attentions], gradients))
    for heatmap in maps:
        assert heatmap.shape == (2, 4, 4)
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert (maps[0] - maps[1]).abs().max() > 0.05
    with pytest.raises(ValueError, match="one gradient per attention layer"):
        gradient_rollout(attentions, gradients[:1])


def test_rollout_of_a_bfloat16_model_matches_float32(chelsea) -> None:
    """Serving in bfloat16 must not blur the heatmap: the explicit path normalises attention in float32 and rollout
    multiplies in float32, so the grid matches the float32 model's (measured max |d| 7e-5 here, 2e-4 for s16)."""
    import numpy as np

    model = make_tiny_model(image_size=224, patch_size=16, hidden_dim=64, num_heads=4, mlp_dim=128, depth=4)
    photo = torch.from_numpy(np.asarray(chelsea.resize((224, 224))).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W)
    with torch.no_grad():
        _, attentions = model.forward_with_attention(photo)
        bf16 = make_tiny_model(image_size=224, patch_size=16, hidden_dim=64, num_heads=4, mlp_dim=128, depth=4)
        _, bf16_attentions = bf16.to(torch.bfloat16).forward_with_attention(photo)
    assert all(a.dtype == torch.float32 for a in bf16_attentions)  # weights leave the blocks in float32
    expected, got = attention_rollout(attentions), attention_rollout(bf16_attentions)
    assert got.dtype == torch.float32 and got.shape == (1, 14, 14)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.999
