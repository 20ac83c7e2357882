"""DINOv2 through `petvit import`: transformers' own Dinov2Model at random init (LayerScale, patch 14, position
embeddings learned at 518 px), saved with save_pretrained and the processor its hub repos carry, becomes a backbone
artifact whose feature is transformers' pooler_output at 224 px (the processor's crop; the embeddings resampled
once as Dinov2Model resamples them) and at 518 px (--image-size 518); its attention is transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.main import main as petvit
from model.artifact import load_artifact
from model.labels import PET_LABELS
from model.rollout import attention_rollout
from tests.hub_checkpoints import digits_folder, hf_dinov2, normalized, photo_pixels, probe_argv, timm_model

TOLERANCE = 1e-4
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("dinov2") / "published"
    return folder, hf_dinov2(folder, image_size=518, crop=224)


def feature(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(pixels), pre_logits=True)


@pytest.mark.parametrize("side", [224, 518])
def test_cls_feature_is_transformers_pooler_output(dinov2, chelsea, tmp_path: Path, side: int) -> None:
    folder, reference = dinov2
    out = tmp_path / "dinov2.safetensors"
    size = [] if side == 224 else ["--image-size", str(side)]  # 224: the processor's crop, the default
    assert petvit(["import", str(folder), *size, "--out", str(out)]) == 0
    model, meta = load_artifact(out)
    pixels = photo_pixels(chelsea, side)
    with torch.no_grad():
        theirs = reference(pixel_values=normalized(pixels, *IMAGENET)).pooler_output
    ours = feature(model, pixels)
    assert theirs.shape == ours.shape == (1, 64) and theirs.std() > 0.1
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    assert meta.config.image_size == side and meta.config.patch_size == 14 and meta.config.layer_scale
    pre = meta.preprocessing  # DINOv2's processor: shorter side 256 (of a 224 crop), bicubic, ImageNet mean/std
    assert (pre.resize_mode, pre.image_size, pre.interpolation) == ("shorter_side", side, "bicubic")
    assert pre.resize_size == round(side * 256 / 224) and pre.mean == tuple(IMAGENET[0])
    assert not meta.trained and meta.labels == list(PET_LABELS) and torch.count_nonzero(model.head.weight) == 0
    assert meta.training["recipe"] == "imported-backbone"


@pytest.mark.parametrize("side", [518, 224])
def test_timm_dinov2_imports_exactly_at_its_size_and_resampled(tmp_path: Path, chelsea, side: int) -> None:
    """timm publishes DINOv2 without a classifier, at 518 px; at 224 px it resamples the position embeddings with
    antialiasing (dynamic_img_size), which the import reproduces once."""
    reference = timm_model(tmp_path / "timm", "vit_small_patch14_dinov2", num_classes=0, embed_dim=64, num_heads=4,
                           dynamic_img_size=True)  # fmt: skip
    out = tmp_path / "dinov2.safetensors"
    size = [] if side == 518 else ["--image-size", str(side)]
    assert petvit(["import", str(tmp_path / "timm"), *size, "--out", str(out)]) == 0
    model, meta = load_artifact(out)
    pixels = photo_pixels(chelsea, side)
    with torch.no_grad():
        theirs = reference(normalized(pixels, *IMAGENET))  # num_classes=0: the pooled (CLS) feature
    ours = feature(model, pixels)
    assert theirs.shape == ours.shape == (1, 64) and theirs.std() > 0.1
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    assert meta.config.layer_scale and meta.config.image_size == side and not meta.trained
    pre = meta.preprocessing  # timm's pretrained_cfg: crop_pct 1.0, bicubic, ImageNet mean/std
    assert (pre.image_size, pre.resize_size, pre.interpolation) == (side, side, "bicubic")


def test_attention_is_transformers_own_so_rollout_reads_the_same_flow(dinov2, chelsea, tmp_path: Path) -> None:
    folder, reference = dinov2
    out = tmp_path / "dinov2.safetensors"
    assert petvit(["import", str(folder), "--out", str(out)]) == 0
    model, _ = load_artifact(out)
    pixels = photo_pixels(chelsea, 224)
    reference.config._attn_implementation = "eager"  # the path that returns its weights
    with torch.no_grad():
        theirs = reference(pixel_values=normalized(pixels, *IMAGENET), output_attentions=True).attentions
        _, ours = model.forward_with_attention(pixels)
    assert ours[0].shape == (1, 4, 257, 257)  # CLS + 16 x 16 patches of 14 px
    for mine, their in zip(ours, theirs, strict=True):
        assert (mine - their).abs().max().item() <= 1e-5
    heatmap = attention_rollout(ours, num_prefix_tokens=model.num_prefix_tokens)
    assert heatmap.shape == (1, 16, 16) and torch.allclose(heatmap, attention_rollout(list(theirs)))


def test_variants_we_do_not_represent_are_refused_by_name(tmp_path: Path, capsys) -> None:
    from transformers import (
        Dinov2Config,
        Dinov2ForImageClassification,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**small)).save_pretrained(tmp_path / "registers")
    Dinov2Model(Dinov2Config(**small, use_swiglu_ffn=True)).save_pretrained(tmp_path / "swiglu")
    Dinov2ForImageClassification(Dinov2Config(**small, num_labels=3)).save_pretrained(tmp_path / "classifier")
    refused = (("registers", "register tokens"), ("swiglu", "SwiGLU"), ("classifier", "mean patch token"))
    for name, named in refused:
        assert petvit(["import", str(tmp_path / name), "--out", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits"))


def test_linear_probe_trains_a_head_on_the_frozen_dinov2_feature(dinov2, digits_root, chelsea, tmp_path) -> None:
    folder, _ = dinov2
    start = tmp_path / "dinov2.safetensors"
    assert petvit(["import", str(folder), "--out", str(start)]) == 0
    out = tmp_path / "probe.safetensors"
    assert petvit(probe_argv(start, digits_root, out)) == 0
    backbone, start_meta = load_artifact(start)
    model, meta = load_artifact(out)
    assert meta.config == start_meta.config.replace(num_classes=10) and meta.labels == [str(d) for d in range(10)]
    for name, tensor in backbone.state_dict().items():  # frozen: every backbone weight as imported
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.count_nonzero(model.head.weight) > 0 and meta.trained
    assert meta.preprocessing == start_meta.preprocessing  # DINOv2's policy carried into the trained artifact
    images = photo_pixels(chelsea, 224)
    with torch.no_grad():  # the served answer is the probe's head on the frozen CLS feature
        assert torch.allclose(model(images), model.head(feature(backbone, images)), atol=1e-5)
