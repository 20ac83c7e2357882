"""model/trust.py: the open-set scores against their definitions, and the artifact round trip of a temperature, the
thresholds and the open-set tensors (an artifact without them reads and re-saves exactly as before)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model.artifact import METADATA_KEY, ArtifactError, load_artifact, read_metadata, save_artifact
from model.trust import (
    CLASS_MEANS,
    PRECISION,
    TENSOR_PREFIX,
    Calibration,
    OpenSet,
    calibrated,
    energy_score,
    mahalanobis_score,
    msp_score,
)
from model.vit import ViT
from tests.conftest import make_tiny_model


def fitted_open_set(model: ViT, threshold: float = 12.5) -> OpenSet:
    d, c = model.config.hidden_dim, model.config.num_classes
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=generator)
    precision = a @ a.T / d + torch.eye(d)  # symmetric positive definite
    means = torch.randn(c, d, generator=generator)
    return OpenSet(
        score="mahalanobis",
        thresholds={"mahalanobis": threshold, "msp": -0.5, "energy": -2.0},
        fitted={"num_train": 10},
        tensors={CLASS_MEANS: means, PRECISION: precision},
    )


def test_scores_match_their_definitions() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=generator) * 3
    np.testing.assert_allclose(msp_score(logits), -torch.softmax(logits, -1).max(-1).values, rtol=1e-6)
    np.testing.assert_allclose(energy_score(logits), -np.log(np.exp(logits.double().numpy()).sum(-1)), rtol=1e-5)
    features, means = torch.randn(6, 5, generator=generator), torch.randn(3, 5, generator=generator)
    a = torch.randn(5, 5, generator=generator)
    precision = a @ a.T + 0.5 * torch.eye(5)
    brute = [
        min(float((f - m).double() @ precision.double() @ (f - m).double()) for m in means) for f in features
    ]  # d^2 = (f - mu)^T P (f - mu), nearest class
    np.testing.assert_allclose(mahalanobis_score(features, means, precision), brute, rtol=1e-5)


def test_calibrated_divides_logits_by_the_temperature_and_keeps_the_top_class() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    soft = calibrated(logits, Calibration(2.0)).softmax(-1)
    np.testing.assert_allclose(soft, torch.tensor([[1.0, 0.5, -0.5]]).softmax(-1))
    assert soft.argmax() == logits.argmax() and soft.max() < logits.softmax(-1).max()
    assert calibrated(logits, None) is logits
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            Calibration(bad)


def test_artifact_round_trips_temperature_threshold_and_open_set_tensors(tmp_path: Path) -> None:
    model = make_tiny_model()
    open_set = fitted_open_set(model)
    calibration = Calibration(1.7, ece_before=0.08, ece_after=0.02, num_images=40)
    path = save_artifact(model, tmp_path / "a.safetensors", {"calibration": calibration, "open_set": open_set})

    loaded_model, meta = load_artifact(path)
    assert meta.calibration == calibration and meta.calibration.temperature == 1.7
    assert meta.open_set == open_set and meta.open_set.threshold == 12.5
    for name in (CLASS_MEANS, PRECISION):
        torch.testing.assert_close(meta.open_set.tensors[name], open_set.tensors[name], rtol=0, atol=0)
    # The tensors are safetensors tensors beside the weights, not JSON floats; the header stays small.
    with safe_open(str(path), "pt") as f:
        assert {TENSOR_PREFIX + CLASS_MEANS, TENSOR_PREFIX + PRECISION} <= set(f.keys())
        doc = json.loads(f.metadata()[METADATA_KEY])
    assert doc["calibration"]["temperature"] == 1.7 and doc["open_set"]["threshold"] == 12.5
    assert len(json.dumps(doc["open_set"])) < 1000
    assert set(loaded_model.state_dict()) == set(model.state_dict())  # the open-set tensors are not weights
    # The header alone (read_metadata) knows the threshold but not the tensors.
    header_only = read_metadata(path).open_set
    assert header_only.threshold == 12.5 and header_only.tensors == {}
    # Re-saving a loaded artifact keeps everything.
    again = save_artifact(loaded_model, tmp_path / "b.safetensors", meta)
    assert load_artifact(again)[1].open_set.tensors[PRECISION].equal(open_set.tensors[PRECISION])


def test_artifact_without_trust_fields_reads_and_writes_as_before(tiny_artifact: Path, tmp_path: Path) -> None:
    model, meta = load_artifact(tiny_artifact)
    assert meta.calibration is None and meta.open_set is None
    assert "calibration" not in meta.to_dict() and "open_set" not in meta.to_dict()
    path = save_artifact(model, tmp_path / "same.safetensors", meta)
    with safe_open(str(path), "pt") as f:
        names = f.keys()
    assert not any(k.startswith(TENSOR_PREFIX) for k in names)


def test_damaged_trust_metadata_is_refused_with_a_message(tmp_path: Path) -> None:
    model = make_tiny_model()
    with pytest.raises(ArtifactError, match="calibration or open-set"):
        save_artifact(model, tmp_path / "t.safetensors", {"calibration": {"temperature": -2}})
    # A Mahalanobis open set whose tensors are missing from the file.
    bare = OpenSet(score="mahalanobis", thresholds={"mahalanobis": 3.0})
    path = save_artifact(model, tmp_path / "bare.safetensors", {"open_set": bare})
    with pytest.raises(ArtifactError, match="lacks its class means"):
        load_artifact(path)
    # An msp open set needs no tensors.
    path = save_artifact(model, tmp_path / "msp.safetensors", {"open_set": OpenSet("msp", {"msp": -0.4})})
    assert load_artifact(path)[1].open_set.threshold == -0.4


def test_forward_with_features_is_forward_plus_the_cls_token(tiny_model: ViT) -> None:
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = tiny_model.forward_with_features(images)
        torch.testing.assert_close(logits, tiny_model(images))
        torch.testing.assert_close(features, tiny_model.forward_features(images)[:, 0])
    distilled = make_tiny_model(distilled=True)
    with torch.no_grad():
        logits, features = distilled.forward_with_features(images)
        tokens = distilled.forward_features(images)
    torch.testing.assert_close(logits, distilled(images))
    torch.testing.assert_close(features, tokens[:, 0])  # the CLS token, not the distillation token
