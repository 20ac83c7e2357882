"""Convnet teacher artifacts (model/convert/teachers.py): build, save, load, refuse; ImageNet weights through
torchvision's API from the hub cache, and the offline message; load_teacher for either kind of artifact."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torchvision.models import ResNet18_Weights, resnet18

from model.artifact import ArtifactError, NotAViTArtifactError, file_sha256, load_artifact, read_metadata
from model.convert.pretrained import PretrainedWeightsUnavailable
from model.convert.teachers import (
    ConvNet,
    build_convnet,
    convnet_names,
    load_convnet_artifact,
    load_teacher,
    save_convnet_artifact,
)

LABELS = [f"digit_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def convnet_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_convnet("resnet18", 10, "random", image_size=32)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.safetensors"
    fields = {"name": "t", "trained": True, "labels": LABELS, "evaluation": {"top1": 0.97}}
    return save_convnet_artifact(model.eval(), path, fields)


def test_convnet_artifact_is_torchvisions_state_dict_plus_the_document(convnet_artifact: Path) -> None:
    with open(convnet_artifact, "rb") as f:
        assert f.read(9)[8:9] == b"{"  # safetensors, not a pickle
    with safe_open(str(convnet_artifact), framework="pt") as f:
        doc = json.loads(f.metadata()["petvit"])
        keys = set(f.keys())
    assert doc["architecture"] == {"kind": "torchvision", "name": "resnet18", "num_classes": 10}
    assert doc["format"] == "petvit-artifact" and doc["labels"] == LABELS and doc["evaluation"] == {"top1": 0.97}
    assert doc["preprocessing"]["image_size"] == 32 and doc["preprocessing"]["resize_size"] == 37
    assert keys == set(resnet18(num_classes=10).state_dict())  # loadable by torchvision alone, no prefix


def test_convnet_round_trip_gives_the_same_logits(convnet_artifact: Path) -> None:
    torch.manual_seed(0)
    original = build_convnet("resnet18", 10, "random", image_size=32).eval()
    loaded, _ = load_convnet_artifact(convnet_artifact)
    assert isinstance(loaded, ConvNet) and loaded.arch == "resnet18" and loaded.image_size == 32
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = original(images)
        assert torch.equal(loaded(images), expected)
        torch.testing.assert_close(loaded(images.float() / 255), expected, atol=1e-5, rtol=1e-5)
    assert expected.shape == (2, 10) and expected.std() > 0


def test_convnet_normalises_like_torchvision_expects() -> None:
    torch.manual_seed(0)
    model = build_convnet("resnet18", 10, "random").eval()
    images = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = model.net((images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


def test_the_service_loader_refuses_a_convnet_with_a_message(convnet_artifact: Path) -> None:
    for load in (load_artifact, read_metadata):
        with pytest.raises(NotAViTArtifactError) as caught:
            load(convnet_artifact)
        message = str(caught.value)
        assert "torchvision resnet18 network, not a ViT" in message and "--recipe distill --teacher" in message
    assert issubclass(NotAViTArtifactError, ArtifactError)  # what the service and the CLI already catch


def test_load_teacher_takes_a_convnet_or_a_vit(convnet_artifact: Path, tiny_artifact: Path) -> None:
    convnet = load_teacher(convnet_artifact)
    assert convnet.arch == "resnet18" and convnet.labels == LABELS and convnet.test_top1 == 0.97
    assert not convnet.module.training and not any(p.requires_grad for p in convnet.module.parameters())
    assert convnet.identity() == {
        "path": str(convnet_artifact),
        "sha256": file_sha256(convnet_artifact),
        "arch": "resnet18",
        "test_top1": 0.97,
    }
    vit = load_teacher(tiny_artifact)
    assert vit.arch == "vit-tiny" and len(vit.labels) == 37 and vit.test_top1 == 0.5
    assert not any(p.requires_grad for p in vit.module.parameters())


def test_a_missing_teacher_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no teacher artifact at .*--recipe teacher --arch resnet50"):
        load_teacher(tmp_path / "nope.safetensors")


def test_a_convnet_artifact_with_other_weights_is_refused(tmp_path: Path, convnet_artifact: Path) -> None:
    with safe_open(str(convnet_artifact), framework="pt") as f:
        doc = json.loads(f.metadata()["petvit"])
    doc["architecture"]["name"] = "resnet34"  # resnet18's tensors under resnet34's name
    from safetensors.torch import load_file, save_file

    path = tmp_path / "wrong.safetensors"
    save_file(load_file(convnet_artifact), path, metadata={"petvit": json.dumps(doc)})
    with pytest.raises(ArtifactError, match="the convnet teacher does not load"):
        load_teacher(path)


def test_names_are_torchvisions_convnets() -> None:
    names = convnet_names()
    assert {"resnet18", "resnet50", "regnet_y_400mf", "convnext_tiny", "efficientnet_b0"} <= set(names)
    assert not {"vit_b_16", "swin_t", "inception_v3", "googlenet"} & set(names)
    with pytest.raises(ValueError, match="unknown convnet 'vit_b_16'"):
        build_convnet("vit_b_16", 10)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def refuse(url: str, *args: object, **kwargs: object) -> None:  # no network, deterministically
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path


def test_imagenet_init_reads_the_hub_cache_and_replaces_the_classifier(torch_home: Path) -> None:
    torch.manual_seed(1)
    imagenet = resnet18()  # stands in for ImageNet weights, under the real file name
    path = torch_home / "hub" / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    model = build_convnet("resnet18", 10, "imagenet")
    ours, theirs = model.net.state_dict(), imagenet.state_dict()
    for name, tensor in ours.items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, theirs[name]), name
    assert model.net.fc.weight.shape == (10, 512)


def test_imagenet_init_offline_names_the_file_and_the_folder(torch_home: Path) -> None:
    with pytest.raises(PretrainedWeightsUnavailable) as caught:
        build_convnet("resnet18", 10, "imagenet")
    message = str(caught.value)
    assert Path(ResNet18_Weights.DEFAULT.url).name in message and str(torch_home / "hub" / "checkpoints") in message
