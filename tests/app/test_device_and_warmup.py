"""The service's device, dtype and warm-up: bf16 where the hardware runs it; warm the batch sizes that form."""

from __future__ import annotations

import pytest
import torch

from model import precision
from model.artifact import ArtifactError
from model.batch_sizes import warmup_sizes
from model.inference import Classifier

from .fixtures import make_settings, png_bytes, running_app


@pytest.mark.parametrize(
    ("max_batch", "policy", "device", "expected"),
    [
        (16, "auto", "cpu", [1, 2, 4, 8, 16]),
        (12, "auto", "cpu", [1, 2, 4, 8, 12]),  # the maximum is always warmed, even off the powers of two
        (5, "auto", "cuda", [1, 2, 3, 4, 5]),  # accelerators: every size the batcher can form
        (3, "all", "cpu", [1, 2, 3]),
        (16, "none", "cuda", []),
    ],
)
def test_warmup_sizes_follow_the_policy_and_device(max_batch, policy, device, expected):
    assert warmup_sizes(max_batch, policy, torch.device(device)) == expected


def test_a_missing_device_is_refused_with_its_name(monkeypatch, tiny_artifact):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU") as err:
        Classifier.from_artifact(tiny_artifact, device="cuda")
    assert not isinstance(err.value, ArtifactError)  # the artifact is fine; the device is what is missing


def test_bfloat16_predictor_keeps_float32_normalisation_and_matches_float32(tiny_artifact):
    fp32 = Classifier.from_artifact(tiny_artifact, device="cpu", dtype="float32")
    bf16 = Classifier.from_artifact(tiny_artifact, device="cpu", dtype="bfloat16")
    assert bf16.model.mean.dtype is torch.float32 and bf16.model.patch_embed.weight.dtype is torch.bfloat16
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    [a], [b] = fp32.predict([image]), bf16.predict([image])
    assert torch.allclose(a.probs, b.probs, atol=0.05)  # bf16 rounding only, no normalisation drift


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
async def test_default_dtype_follows_the_cpu_and_is_shown_everywhere(monkeypatch, tiny_artifact, native, expected):
    """PETVIT_DTYPE=auto: bfloat16 on a CPU that runs it natively, float32 on one that would only emulate it; the
    choice is in /readyz, /v1/model and petvit_model_info{dtype}."""
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: native)
    async with running_app(make_settings(tiny_artifact, dtype="auto")) as (client, service):
        assert service.models.ready, service.models.message
        assert service.models.predictor.model.pos_embed.dtype == getattr(torch, expected)
        assert (await client.get("/readyz")).json()["dtype"] == expected
        assert (await client.get("/v1/model")).json()["dtype"] == expected
        response = await client.post("/classify", files={"file": ("a.png", png_bytes(1), "image/png")})
        assert response.status_code == 200 and len(response.json()["results"][0]["predictions"]) == 5
        labels = {"name": "petvit-tiny-test", "arch": service.models.predictor.architecture, "dtype": expected}
        labels["sha256"] = service.models.predictor.sha256
        assert service.metrics.registry.get_sample_value("petvit_model_info", labels) == 1.0
