"""CLIP through `petvit import`: transformers' own CLIPModel at random init, saved with save_pretrained beside a
hand-written tokenizer, becomes an artifact whose logits are transformers' logits_per_image for the same prompts
(--zero-shot), or a backbone whose feature is get_image_features; its attention is transformers' own, so rollout
heatmaps read the same flow; SigLIP is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli.main import main as petvit
from model.artifact import load_artifact
from model.convert.zero_shot import DEFAULT_TEMPLATES
from model.labels import PET_LABELS, PET_SPECIES
from model.rollout import attention_rollout
from tests.hub_checkpoints import digits_folder, hf_clip, normalized, photo_pixels, probe_argv

TOLERANCE = 1e-4
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("clip") / "published"
    model, tokenizer = hf_clip(folder)
    return folder, model, tokenizer


def embeds(out) -> torch.Tensor:
    """get_image_features / get_text_features: a tensor before transformers 5, an output's pooler_output since."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def two_photos(chelsea) -> torch.Tensor:
    pixels = photo_pixels(chelsea, 56)  # (1, 3, 56, 56) uint8: CLIP's processor would crop 56 from it unchanged
    return torch.cat([pixels, pixels.flip(-1).roll(9, dims=-2)])  # (2, 3, 56, 56): two different inputs


def test_zero_shot_logits_are_transformers_logits_per_image(clip, chelsea, tmp_path: Path) -> None:
    folder, reference, tokenizer = clip
    names = ["tabby cat", "Golden Retriever", "a {weird} name", "hamster"]
    labels = tmp_path / "classes.txt"
    labels.write_text("\n".join(names) + "\n\n")
    out = tmp_path / "zero-shot.safetensors"
    argv = ["import", str(folder), "--zero-shot", str(labels), "--template", "a photo of a {}.", "--out", str(out)]
    assert petvit(argv) == 0
    model, meta = load_artifact(out)
    pixels = two_photos(chelsea)
    prompts = [f"a photo of a {name}." for name in names]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = reference(**tokens, pixel_values=normalized(pixels, CLIP_MEAN, CLIP_STD)).logits_per_image
        ours = model(pixels)
    assert theirs.shape == ours.shape == (2, 4)
    assert theirs.std() > 0.1, "the reference logits are nearly constant: the comparison would prove nothing"
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    assert meta.labels == names and meta.species == ["unknown"] * 4
    assert set(meta.provenance["files_sha256"]) >= {"model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert meta.trained and meta.training["recipe"] == "zero-shot"
    assert meta.training["templates"] == ["a photo of a {}."]
    assert meta.training["logit_scale"] == pytest.approx(float(reference.logit_scale.detach().exp()))
    config = meta.config
    assert (config.pre_norm, config.activation, config.projection_dim, config.normalize_features) == (
        True, "quick_gelu", 32, True)  # fmt: skip
    pre = meta.preprocessing  # CLIPImageProcessor: shorter side, centre crop, bicubic, CLIP's mean/std
    assert (pre.resize_mode, pre.resize_size, pre.image_size, pre.interpolation) == ("shorter_side", 56, 56, "bicubic")
    assert pre.mean == tuple(CLIP_MEAN)


def test_zero_shot_pets_takes_the_37_breeds_and_the_default_ensemble(clip, chelsea, tmp_path: Path) -> None:
    folder, reference, tokenizer = clip
    out = tmp_path / "pets.safetensors"
    assert petvit(["import", str(folder), "--zero-shot", "pets", "--out", str(out)]) == 0
    model, meta = load_artifact(out)
    assert meta.labels == list(PET_LABELS) and meta.species == list(PET_SPECIES)
    assert meta.training["templates"] == list(DEFAULT_TEMPLATES)
    # The ensemble by hand from transformers' own towers: per breed, the mean of unit prompt embeddings, renormalised.
    pixels = two_photos(chelsea)
    with torch.no_grad():
        image = embeds(reference.get_image_features(pixel_values=normalized(pixels, CLIP_MEAN, CLIP_STD)))
        image = F.normalize(image, dim=-1)
        rows = []
        for breed in PET_LABELS:
            tokens = tokenizer([t.replace("{}", breed) for t in DEFAULT_TEMPLATES], padding=True, return_tensors="pt")
            text = F.normalize(embeds(reference.get_text_features(**tokens)), dim=-1)  # (8, E)
            rows.append(F.normalize(text.mean(dim=0), dim=-1))
        theirs = reference.logit_scale.exp() * image @ torch.stack(rows).T  # (2, 37)
        ours = model(pixels)
    assert theirs.std() > 0.1
    assert (theirs - ours).abs().max().item() <= TOLERANCE


def test_without_zero_shot_clip_is_a_backbone_whose_feature_is_get_image_features(clip, chelsea, tmp_path) -> None:
    folder, reference, _ = clip
    out = tmp_path / "tower.safetensors"
    assert petvit(["import", str(folder), "--out", str(out)]) == 0
    model, meta = load_artifact(out)
    pixels = two_photos(chelsea)
    with torch.no_grad():
        theirs = embeds(reference.get_image_features(pixel_values=normalized(pixels, CLIP_MEAN, CLIP_STD)))
        ours = model.forward_head(model.forward_features(pixels), pre_logits=True)
    assert ours.shape == (2, 32) and (theirs - ours).abs().max().item() <= TOLERANCE
    assert not meta.trained and meta.training["recipe"] == "imported-backbone"
    assert torch.count_nonzero(model.head.weight) == 0 and meta.labels == list(PET_LABELS)


def test_attention_is_transformers_own_so_rollout_reads_the_same_flow(clip, chelsea, tmp_path: Path) -> None:
    folder, reference, _ = clip
    out = tmp_path / "pets.safetensors"
    assert petvit(["import", str(folder), "--zero-shot", "pets", "--template", "a {}.", "--out", str(out)]) == 0
    model, _ = load_artifact(out)
    pixels = two_photos(chelsea)
    reference.vision_model.config._attn_implementation = "eager"  # the path that returns its weights
    with torch.no_grad():
        theirs = reference.vision_model(pixel_values=normalized(pixels, CLIP_MEAN, CLIP_STD), output_attentions=True)
        logits, ours = model.forward_with_attention(pixels)
        assert torch.allclose(logits, model(pixels), atol=1e-5)
    assert len(ours) == 2 and ours[0].shape == (2, 4, 17, 17)  # CLS + a 4 x 4 grid of 14 px patches
    for mine, their in zip(ours, theirs.attentions, strict=True):
        assert (mine - their).abs().max().item() <= 1e-5
    heatmap = attention_rollout(ours, num_prefix_tokens=model.num_prefix_tokens)
    assert heatmap.shape == (2, 4, 4) and torch.allclose(heatmap, attention_rollout(list(theirs.attentions)))


def test_zero_shot_refusals_say_what_to_fix(clip, tmp_path: Path, capsys) -> None:
    folder, _, _ = clip
    out = str(tmp_path / "x.safetensors")
    assert petvit(["import", str(folder), "--zero-shot", "pets", "--template", "a photo", "--out", out]) == 2
    assert "needs {} where the class name goes" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("cat\n")
    assert petvit(["import", str(folder), "--zero-shot", str(one), "--out", out]) == 2
    assert "at least two" in capsys.readouterr().err
    assert petvit(["import", str(folder), "--template", "a {}.", "--out", out]) == 2
    assert "--template applies with --zero-shot only" in capsys.readouterr().err
    assert petvit(["import", str(folder), "--labels", "pets", "--out", out]) == 2
    assert "no classifier to put in Pets order" in capsys.readouterr().err
    (folder.parent / "tokenless").mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (folder.parent / "tokenless" / name).symlink_to(folder / name)
    assert petvit(["import", str(folder.parent / "tokenless"), "--zero-shot", "pets", "--out", out]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not Path(out).exists()


def test_siglip_is_refused_by_name(tmp_path: Path, capsys) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                image_size=28, patch_size=14)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    assert petvit(["import", str(tmp_path / "siglip"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no class token" in err and "attention-pooling head" in err and "Traceback" not in err


@pytest.mark.parametrize("recipe", ["linear-probe", "finetune"])
def test_a_clip_tower_starts_training_with_its_own_preprocessing(clip, tmp_path: Path, recipe: str) -> None:
    """--init from the zero-shot artifact: the new head reads the projected, normalised feature (width 32)."""
    folder, _, _ = clip
    start = tmp_path / "zero-shot.safetensors"
    assert petvit(["import", str(folder), "--zero-shot", "pets", "--template", "a {}.", "--out", str(start)]) == 0
    out = tmp_path / "trained.safetensors"
    assert petvit(probe_argv(start, digits_folder(tmp_path / "digits", per_class=6), out, recipe)) == 0
    model, meta = load_artifact(out)
    _, start_meta = load_artifact(start)
    assert meta.config == start_meta.config.replace(num_classes=10) and model.head.weight.shape == (10, 32)
    assert meta.preprocessing == start_meta.preprocessing and meta.preprocessing.interpolation == "bicubic"
    assert torch.count_nonzero(model.head.weight) > 0
