"""An imported checkpoint behind the service: its labels come back from /classify, its preprocessing policy (Hugging
Face's squash resize with mean/std 0.5) is what the service applies on both input paths, and over real HTTP its
top-k matches transformers' own image-classification pipeline on the same photo. Artifacts written before the
policy existed keep today's resize-shorter-side-and-crop."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.gpu_decode import GpuDecoder
from cli.main import main as petvit
from model.artifact import ArtifactMetadata, read_metadata
from model.preprocess import Preprocessing, crop_box, prepare
from tests.conftest import make_tiny_config
from tests.hub_checkpoints import HF_PET_LABELS, hf_vit, photo_pixels

from .fixtures import encode, live_server, make_settings, running_app

SQUASH = Preprocessing(64, 64, "bilinear", (0.5,) * 3, (0.5,) * 3, resize_mode="squash")


@pytest.fixture
def imported(tmp_path: Path) -> Path:
    """A transformers ViT fine-tune stand-in on the 37 breeds (labels spelt the dataset's way), imported."""
    hf_vit(tmp_path / "published")
    out = tmp_path / "imported.safetensors"
    assert petvit(["import", str(tmp_path / "published"), "--out", str(out)]) == 0
    return out


async def test_imported_folder_is_served_with_its_labels(imported: Path, chelsea) -> None:
    async with running_app(make_settings(imported)) as (client, service):
        assert service.models.ready, service.models.message
        response = await client.post("/classify?top_k=37", files={"file": ("cat.png", encode(chelsea, "PNG"))})
        info = (await client.get("/v1/model")).json()
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(HF_PET_LABELS)
    for p in predictions:  # the imported label of each index, and the species its breed has
        assert p["label"] == HF_PET_LABELS[p["index"]]
        assert p["species"] == ("cat" if HF_PET_LABELS[p["index"]] in ("abyssinian", "bengal", "persian",
                                "siamese", "sphynx", "birman", "bombay", "british_shorthair", "egyptian_mau",
                                "maine_coon", "ragdoll", "russian_blue") else "dog")  # fmt: skip
    assert info["preprocessing"]["resize_mode"] == "squash"


def test_served_top_k_matches_the_transformers_pipeline(imported: Path, chelsea, tmp_path: Path) -> None:
    from transformers import pipeline

    png = encode(chelsea, "PNG")
    classifier = pipeline("image-classification", model=str(tmp_path / "published"), device="cpu")
    theirs = classifier(Image.open(io.BytesIO(png)), top_k=5)
    with live_server(make_settings(imported)) as url:
        response = httpx.post(f"{url}/classify?top_k=5", files={"file": ("cat.png", png)}, timeout=30)
    assert response.status_code == 200, response.text
    ours = response.json()["results"][0]["predictions"]
    assert [p["label"] for p in ours] == [t["label"] for t in theirs]
    # Their processor resizes with torchvision, ours with PIL: a grey level here and there, not a ranking.
    np.testing.assert_allclose([p["score"] for p in ours], [t["score"] for t in theirs], atol=0.02)


def test_squash_policy_keeps_the_whole_photo_and_matches_pil(chelsea) -> None:
    assert crop_box(451, 300, SQUASH) == (0.0, 0.0, 451.0, 300.0)
    prepared = prepare(encode(chelsea, "PNG"), SQUASH, 10**9)
    assert torch.equal(prepared.tensor[None], photo_pixels(chelsea, 64))  # PIL's squash, as HF's PIL processor
    # DeiT's processor: squash to 73, crop 64 from the middle
    deit = Preprocessing(64, 73, "bicubic", resize_mode="squash")
    left, top, right, bottom = crop_box(451, 300, deit)
    assert (right - left, bottom - top) == pytest.approx((451 * 64 / 73, 300 * 64 / 73))


def test_gpu_decode_path_follows_the_squash_policy(chelsea) -> None:
    """The device path (here torchvision's CPU decoder) resizes a JPEG to the same squash as the CPU path."""
    jpeg = encode(chelsea, "JPEG", quality=95)
    cpu_path = prepare(jpeg, SQUASH, 10**9).tensor
    deferred = prepare(jpeg, SQUASH, 10**9, defer=True).deferred
    assert deferred is not None
    [device_path] = GpuDecoder(torch.device("cpu"), SQUASH, 10**9).materialize([deferred])
    assert isinstance(device_path, torch.Tensor) and device_path.shape == (3, 64, 64)
    assert (device_path.int() - cpu_path.int()).abs().float().mean() < 3.0


def test_artifacts_without_a_resize_mode_keep_shorter_side_and_crop() -> None:
    config = make_tiny_config()
    old_doc = {"image_size": 32, "resize_size": 37, "interpolation": "bilinear"}  # as petvit wrote it before
    pre = Preprocessing.from_dict(old_doc, config)
    assert pre.resize_mode == "shorter_side"
    assert "resize_mode" not in ArtifactMetadata.create(config).preprocessing.to_dict()  # the old document
    left, top, right, bottom = crop_box(451, 300, pre)
    # the shorter side to 37 (the longer truncated to int(37 * 451 / 300) = 55, as torchvision's Resize), crop 32
    assert (right - left, bottom - top) == pytest.approx((32 * 451 / 55, 300 * 32 / 37))
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocessing(resize_mode="stretch")


def test_imported_metadata_round_trips(imported: Path) -> None:
    meta = read_metadata(imported)
    again = ArtifactMetadata.from_dict(meta.to_dict())
    assert again.preprocessing == meta.preprocessing and again.provenance == meta.provenance
