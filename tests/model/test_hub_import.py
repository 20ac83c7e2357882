"""`petvit import`: transformers' and timm's own ViT/DeiT modules, saved by their own save functions, imported through
the command line and compared with our copy on the same photo pixels (theirs normalised by their processor's
mean/std, ours through the uint8 path); what we cannot represent is refused by name; pickles are never opened;
the hub path works offline from a pre-filled cache."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.main import main as petvit
from model.artifact import load_artifact, read_metadata
from model.labels import PET_LABELS, PET_SPECIES
from tests.hub_checkpoints import (
    HF_PET_LABELS,
    fill_hub_cache,
    hf_deit,
    hf_vit,
    normalized,
    photo_pixels,
    timm_model,
)

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # max |difference| of logits allowed between their module and our import


def import_folder(folder: Path, out: Path) -> tuple[torch.nn.Module, object]:
    assert petvit(["import", str(folder), "--out", str(out)]) == 0
    return load_artifact(out)


def assert_same_logits(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    assert theirs.shape == ours.shape
    assert theirs.std() > 0.1, "the reference logits are nearly constant: the comparison would prove nothing"
    assert (theirs - ours).abs().max().item() <= TOLERANCE, (theirs - ours).abs().max().item()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def hf_and_ours(reference: torch.nn.Module, model: torch.nn.Module, photo, size: int = 64):
    """Both models' logits on the same resized photo pixels: transformers' normalised by its processor's mean/std
    (0.5), ours from the uint8 pixels through its own normalisation."""
    pixels = photo_pixels(photo, size)
    with torch.no_grad():
        return reference(pixel_values=normalized(pixels, [0.5] * 3, [0.5] * 3)).logits, model(pixels)


@pytest.mark.parametrize("patch_size", [16, 32])
def test_transformers_vit_imports_exactly(tmp_path: Path, chelsea, patch_size: int) -> None:
    reference = hf_vit(tmp_path / "hf", patch_size=patch_size)
    model, meta = import_folder(tmp_path / "hf", tmp_path / "vit.safetensors")
    theirs, ours = hf_and_ours(reference, model, chelsea)
    assert_same_logits(theirs, ours)
    assert meta.config.layer_norm_eps == 1e-12 and meta.config.patch_size == patch_size
    assert meta.labels == HF_PET_LABELS
    assert meta.species[0] == "cat" and meta.species[1] == "dog"  # abyssinian, american_bulldog
    pre = meta.preprocessing  # ViTImageProcessor: squash to the input size, no crop, bilinear, mean/std 0.5
    assert (pre.resize_mode, pre.resize_size, pre.image_size, pre.interpolation) == ("squash", 64, 64, "bilinear")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert meta.provenance["architecture"] == "ViTForImageClassification"
    assert len(meta.provenance["files_sha256"]["model.safetensors"]) == 64


def test_pets_labels_take_petvits_names_and_order_exactly(tmp_path: Path, chelsea) -> None:
    """--labels pets: a Pets head published in another order and spelling becomes petvit's, logits permuted."""
    shuffled = [HF_PET_LABELS[i] for i in torch.randperm(37, generator=torch.Generator().manual_seed(0)).tolist()]
    shuffled = [label.replace("_", " ").upper() for label in shuffled]  # e.g. "AMERICAN BULLDOG"
    reference = hf_vit(tmp_path / "hf", labels=shuffled)
    out = tmp_path / "pets.safetensors"
    assert petvit(["import", str(tmp_path / "hf"), "--labels", "pets", "--out", str(out)]) == 0
    model, meta = load_artifact(out)
    assert meta.labels == list(PET_LABELS) and meta.species == list(PET_SPECIES)
    theirs, ours = hf_and_ours(reference, model, chelsea)
    for i, breed in enumerate(PET_LABELS):  # petvit's class i is the published class of the same breed
        published = shuffled.index(breed.upper())
        assert abs(ours[0, i] - theirs[0, published]) <= TOLERANCE
    assert meta.provenance["conversion"]["labels_as_published"] == shuffled


def test_pets_labels_need_the_37_breeds(tmp_path: Path, capsys) -> None:
    hf_vit(tmp_path / "hf", labels=["cat", "dog", "bird"])
    assert petvit(["import", str(tmp_path / "hf"), "--labels", "pets", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "37 Oxford-IIIT Pet breeds" in capsys.readouterr().err


@pytest.mark.parametrize("with_teacher", [True, False])
def test_transformers_deit_imports_exactly(tmp_path: Path, chelsea, with_teacher: bool) -> None:
    reference = hf_deit(tmp_path / "hf", with_teacher=with_teacher)
    model, meta = import_folder(tmp_path / "hf", tmp_path / "deit.safetensors")
    theirs, ours = hf_and_ours(reference, model, chelsea)
    assert_same_logits(theirs, ours)
    assert meta.config.distilled
    if with_teacher:  # each head on its own token, as transformers computes cls_logits and distillation_logits
        pixels = photo_pixels(chelsea, 64)
        with torch.no_grad():
            out = reference(pixel_values=normalized(pixels, [0.5] * 3, [0.5] * 3))
            cls_logits, dist_logits = model.forward_heads(model.forward_features(pixels))
        assert (out.cls_logits - cls_logits).abs().max() <= TOLERANCE
        assert (out.distillation_logits - dist_logits).abs().max() <= TOLERANCE
    # No preprocessor_config.json: DeiTImageProcessor's defaults at this size (squash to 256/224 of it, crop).
    assert (meta.preprocessing.resize_mode, meta.preprocessing.resize_size) == ("squash", 73)


@pytest.mark.parametrize(
    ("architecture", "kwargs"),
    [
        ("vit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_tiny_patch16_224", {"init_values": 0.5}),
    ],
)
def test_timm_vit_and_deit_import_exactly(tmp_path: Path, chelsea, architecture: str, kwargs) -> None:
    """init_values: LayerScale on each residual branch (ViTConfig.layer_scale), its gammas redrawn around 1."""
    reference = timm_model(tmp_path / "timm", architecture, **kwargs)
    model, meta = import_folder(tmp_path / "timm", tmp_path / "timm.safetensors")
    cfg = reference.pretrained_cfg
    pixels = photo_pixels(chelsea, 224)
    with torch.no_grad():
        theirs = reference(normalized(pixels, cfg["mean"], cfg["std"]))
        ours = model(pixels)
    assert_same_logits(theirs, ours)
    assert meta.config.distilled == ("distilled" in architecture)
    assert meta.config.layer_scale == ("init_values" in kwargs)
    assert meta.labels == HF_PET_LABELS
    pre = meta.preprocessing  # timm's eval transform: shorter side to floor(224 / crop_pct), centre crop, bicubic
    expected = ("shorter_side", int(224 / cfg["crop_pct"]), "bicubic")
    assert (pre.resize_mode, pre.resize_size, pre.interpolation) == expected
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"reg_tokens": 4}, "register tokens"),
        ({"global_pool": "avg", "fc_norm": False}, "pools with 'avg'"),
        ({"class_token": False, "global_pool": "avg", "fc_norm": False}, "no class token"),
        ({"qk_norm": True}, "qk_norm"),
    ],
)
def test_timm_variants_we_do_not_represent_are_refused_by_name(tmp_path: Path, capsys, kwargs, named: str) -> None:
    timm_model(tmp_path / "timm", "vit_tiny_patch16_224", **kwargs)
    assert petvit(["import", str(tmp_path / "timm"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_transformers_with_another_activation_is_refused(tmp_path: Path, capsys) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=16, num_labels=3, hidden_act="gelu_new")  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    assert petvit(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "hidden_act 'gelu_new'" in capsys.readouterr().err


def test_image_size_is_refused_where_it_does_not_apply(tmp_path: Path, capsys) -> None:
    hf_vit(tmp_path / "hf")
    argv = ["import", str(tmp_path / "hf"), "--image-size", "32", "--out", str(tmp_path / "x.safetensors")]
    assert petvit(argv) == 2
    assert "--image-size applies to CLIP, DINOv2 and timm" in capsys.readouterr().err


def test_a_config_that_does_not_match_its_weights_is_refused(tmp_path: Path, capsys) -> None:
    hf_vit(tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    assert petvit(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "layer 2 lacks its query/key/value" in err and "Traceback" not in err


def test_a_legacy_feature_extractor_config_is_read(tmp_path: Path) -> None:
    """Checkpoints from the ViTFeatureExtractor days (google/vit-base-patch16-224's) store `size` as a bare int."""
    import json

    hf_vit(tmp_path / "hf")
    legacy = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2, "size": 64}  # fmt: skip
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(legacy))
    _, meta = import_folder(tmp_path / "hf", tmp_path / "legacy.safetensors")
    pre = meta.preprocessing
    assert (pre.resize_mode, pre.resize_size, pre.image_size, pre.mean) == ("squash", 64, 64, (0.5, 0.5, 0.5))


class _Tripwire:
    """Unpickling this creates a file: proof that someone unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "pickled"
    hf_vit(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    assert petvit(["import", str(folder), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "safetensors" in err and "never unpickles" in err
    assert not marker.exists()


def run_import(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    """`petvit import` in its own process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cli", "import", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_hub_source_imports_offline_from_a_prefilled_cache(tmp_path: Path) -> None:
    hf_vit(tmp_path / "published")
    hf_home = tmp_path / "hf-home"
    fill_hub_cache(hf_home, "someone/vit-pets", tmp_path / "published", commit="c0ffee" + "0" * 34)
    out = tmp_path / "hub.safetensors"
    result = run_import(["hf-hub:someone/vit-pets", "--out", str(out)], hf_home)
    assert result.returncode == 0, result.stderr
    meta = read_metadata(out)
    assert meta.name == "someone/vit-pets" and meta.labels == HF_PET_LABELS
    assert meta.provenance["repo"] == "someone/vit-pets" and meta.provenance["revision"] == "c0ffee" + "0" * 34
    assert meta.provenance["source"] == "hf-hub"


def test_a_missing_hub_repo_says_how_to_run_offline(tmp_path: Path) -> None:
    result = run_import(["hf-hub:nobody/not-there", "--out", str(tmp_path / "x.safetensors")], tmp_path / "empty")
    assert result.returncode == 2
    assert "nobody/not-there" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr and "HF_HOME" in result.stderr
    assert "Traceback" not in result.stderr
