"""Our ViT against torchvision's, and each pipeline stage against an independent reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.transforms import functional as TF

from model.artifact import load_artifact
from model.config import IMAGENET_MEAN, IMAGENET_STD, get_config
from model.convert.pretrained import from_torchvision, weights_enum
from model.rollout import attention_rollout, upsample_heatmap
from model.vit import ViT
from tests.conftest import make_tiny_model

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def randomized(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """build() made with random values in every parameter, the zero-initialised head and class token included.

    Built on the meta device and filled once (skipping torchvision's own init saves seconds for ViT-B). LayerNorm
    gains stay near 1 and the head is scaled to give O(1) logits, so a 1e-4 tolerance is a real test.
    """
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(generator=gen)
            if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.mul_(0.1).add_(1.0)
            elif "head" in name and name.endswith("weight"):
                p.div_(p.shape[1] ** 0.5)
            else:
                p.mul_(0.02)
    return module.eval()


def assert_matches_torchvision(tv: VisionTransformer, batch: int = 2) -> ViT:
    ours = from_torchvision(tv)
    images = torch.rand(batch, 3, tv.image_size, tv.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = tv((images - MEAN) / STD)  # torchvision wants normalised input; ours normalises itself
        got = ours(images)
    assert expected.std() > 0.1, "logits too small for the tolerance to mean anything"
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    return ours


@pytest.mark.parametrize(
    ("patch", "width", "heads"),
    [(16, 768, 12), (32, 768, 12), (16, 1024, 16)],
    ids=["b16", "b32", "l16"],
)
def test_depth_cut_variants_match_torchvision(patch: int, width: int, heads: int) -> None:
    tv = randomized(
        lambda: VisionTransformer(224, patch, num_layers=2, num_heads=heads, hidden_dim=width, mlp_dim=4 * width)
    )
    assert_matches_torchvision(tv)


def test_full_depth_b16_matches_torchvision() -> None:
    tv = randomized(vit_b_16)
    ours = assert_matches_torchvision(tv, batch=1)
    assert ours.config == get_config("b16", num_classes=1000)
    assert ours.num_parameters() == sum(p.numel() for p in tv.parameters())


def test_sdpa_path_equals_explicit_softmax_path() -> None:
    model = make_tiny_model()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        fast = model(images)
        explicit, attentions = model.forward_with_attention(images)
    assert (fast - explicit).abs().max().item() <= 1e-5
    assert len(attentions) == model.config.depth
    for weights in attentions:
        assert weights.shape == (3, 2, 17, 17)  # (B, heads, 1 + 4*4, 1 + 4*4)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 17))


def test_patchify_matches_explicit_loop_over_patches() -> None:
    model = make_tiny_model()
    images = torch.randn(2, 3, 16, 24)  # a 2x3 grid of 8-px patches
    expected = torch.stack(
        [
            images[:, :, 8 * r : 8 * (r + 1), 8 * c : 8 * (c + 1)].permute(0, 2, 3, 1).reshape(2, -1)  # (p1 p2 c)
            for r in range(2)
            for c in range(3)
        ],
        dim=1,
    )
    assert torch.equal(model.patchify(images), expected)


def test_patch_embedding_equals_strided_convolution() -> None:
    """Linear over patchify's (p1 p2 c) order is torchvision's Conv2d(kernel=stride=P) with permuted weights."""
    model = make_tiny_model()
    images = torch.randn(2, 3, 32, 32)
    D = model.config.hidden_dim
    conv_weight = model.patch_embed.weight.reshape(D, 8, 8, 3).permute(0, 3, 1, 2)  # (D, P*P*C) -> (D, C, P, P)
    expected = F.conv2d(images, conv_weight, model.patch_embed.bias, stride=8).flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = model.patch_embed(model.patchify(images))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_position_embedding_is_identity_at_native_size() -> None:
    model = make_tiny_model()
    assert torch.equal(model.position_embedding((4, 4)), model.pos_embed)
    # The bicubic resampler itself is the identity at the native size, so no shortcut hides a shift.
    patch_pos = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)  # (1, 16, D) -> (1, D, 4, 4)
    torch.testing.assert_close(F.interpolate(patch_pos, size=(4, 4), mode="bicubic"), patch_pos)


def test_position_embedding_resamples_to_non_square_grid() -> None:
    model = make_tiny_model()
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.linspace(-1, 1, model.config.hidden_dim)  # every patch position alike
    pos = model.position_embedding((7, 10))
    assert pos.shape == (1, 1 + 70, model.config.hidden_dim)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # CLS position is never resampled
    # Bicubic weights sum to one, so a constant field stays constant at any size.
    torch.testing.assert_close(pos[:, 1:], model.pos_embed[:, 1:2].expand(1, 70, -1))


def test_non_square_input_runs_end_to_end() -> None:
    model = make_tiny_model()
    images = torch.rand(2, 3, 56, 80)  # 7x10 patches
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(images)
        torch.testing.assert_close(model(images), logits, atol=1e-5, rtol=1e-5)
    assert logits.shape == (2, 37)
    assert attentions[0].shape == (2, 2, 71, 71)


def test_uint8_and_float_inputs_give_the_same_logits() -> None:
    model = make_tiny_model()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        from_uint8 = model(images)
        from_float = model(images.float() / 255)
        from_double = model(images.double() / 255)
    assert from_uint8.dtype == torch.float32
    assert (from_uint8 - from_float).abs().max().item() <= 1e-5
    assert (from_double - from_float).abs().max().item() <= 1e-5


def test_normalize_applies_mean_and_std_per_channel() -> None:
    model = make_tiny_model()
    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model.normalize(images), (images - MEAN) / STD)


def test_bf16_model_normalises_in_float32_then_casts() -> None:
    model = make_tiny_model().to(torch.bfloat16)
    assert model.mean.dtype == model.std.dtype == torch.float32  # .to(bf16) leaves the constants exact
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    got = model.normalize(images)
    assert got.dtype == torch.bfloat16
    expected = ((images / 255 - MEAN) / STD).to(torch.bfloat16)
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2**-8)  # at most one bf16 rounding step


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.rand(1, 1, 32, 32), ValueError, r"expected images of shape \(B, 3, H, W\), got \(1, 1, 32, 32\)"),
        (torch.rand(3, 32, 32), ValueError, r"expected images of shape \(B, 3, H, W\), got \(3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), TypeError, r"uint8 images in 0\.\.255 or float.*torch\.int64"),
        (torch.rand(1, 3, 30, 32), ValueError, r"multiples of the patch size 8, got 30x32"),
        (torch.rand(1, 3, 32, 36), ValueError, r"multiples of the patch size 8, got 32x36"),
    ],
    ids=["channels", "no-batch-axis", "dtype", "height", "width"],
)
def test_wrong_inputs_say_what_was_expected(images: torch.Tensor, error: type[Exception], message: str) -> None:
    model = make_tiny_model()
    with pytest.raises(error, match=message):
        model(images)
    with pytest.raises(error, match=message):
        model.forward_with_attention(images)


def test_forward_head_pre_logits_and_reset_head() -> None:
    model = make_tiny_model()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        features = model.forward_head(tokens, pre_logits=True)
        assert tokens.shape == (2, 17, 32)
        assert torch.equal(features, tokens[:, 0])
        torch.testing.assert_close(model.forward_head(tokens), model.head(features))
        model.reset_head(5)
        logits = model(images)
    assert model.config.num_classes == 5
    assert logits.shape == (2, 5)
    assert torch.count_nonzero(logits) == 0  # a fresh head is zero: every class starts equal


def test_default_init_is_trainable_from_scratch() -> None:
    torch.manual_seed(0)
    model = ViT(get_config("ti16", depth=1))
    assert 0.015 < model.pos_embed.std().item() < 0.025  # trunc_normal(std=0.02)
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(192))


def test_flops_per_image_matches_torch_flop_counter() -> None:
    model = make_tiny_model()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.forward_with_attention(torch.rand(1, 3, 32, 32))  # explicit matmuls: every FLOP is counted
    assert model.flops_per_image() == counter.get_total_flops()


@pytest.mark.parametrize("variant", ["b16", "b32", "l16", "l32", "h14"])
def test_flops_per_image_matches_torchvision_published_figure(variant: str) -> None:
    """torchvision's weights meta "_ops" is GMACs per image at the weights' size (17.564 for ViT-B/16)."""
    entry = weights_enum(variant)
    size = entry.meta["min_size"][0]
    with torch.device("meta"):  # the arithmetic only needs the config; no parameters to initialise
        model = ViT(get_config(variant, num_classes=1000, image_size=size))
    assert model.flops_per_image() / 2e9 == pytest.approx(entry.meta["_ops"], abs=5e-4)


def test_real_photo_end_to_end(chelsea: Image.Image, tiny_artifact: Path) -> None:
    """A real photo, prepared as the artifact's metadata says, through the model and attention rollout."""
    model, meta = load_artifact(tiny_artifact)
    prep = meta.preprocessing.to_dict()
    image = TF.center_crop(TF.resize(chelsea, prep["resize_size"]), prep["image_size"])
    batch = TF.pil_to_tensor(image)[None]  # (1, 3, 32, 32) uint8, as the service ships it
    assert batch.dtype == torch.uint8 and batch.shape == (1, 3, 32, 32)
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(batch)
        torch.testing.assert_close(model(batch), logits, atol=1e-5, rtol=1e-5)
    assert logits.shape == (1, 37) and torch.isfinite(logits).all()
    grid = attention_rollout(attentions)
    assert grid.shape == (1, 4, 4)
    overlay = upsample_heatmap(grid[0], (chelsea.height, chelsea.width))
    assert overlay.shape == (300, 451) and overlay.min() >= 0 and overlay.max() <= 1
