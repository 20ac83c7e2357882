"""The service with a distilled artifact (DeiT's two heads: the answer is their mean, the heatmap the CLS row), and
with a convnet teacher artifact, which it refuses with a message instead of serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import load_artifact, save_artifact
from model.convert.teachers import build_convnet, save_convnet_artifact
from model.explain import DEFAULT_METHOD, SERVICE_METHODS
from model.preprocess import prepare
from model.rollout import attention_rollout
from tests.conftest import make_tiny_model

from .fixtures import make_settings, png_bytes, running_app


@pytest.fixture(scope="module")
def distilled_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny distilled 37-class artifact whose two heads disagree, so averaging them is visible."""
    model = make_tiny_model(3, distilled=True)
    with torch.no_grad():
        model.head_dist.weight.normal_(std=0.5)
        model.head_dist.bias.normal_(std=0.5)
        model.dist_token.normal_(std=0.5)
    path = tmp_path_factory.mktemp("distilled") / "distilled.safetensors"
    return save_artifact(model, path, {"name": "petvit-tiny-distilled", "variant": "tiny", "trained": True})


def what_the_model_says(artifact: Path, data: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(averaged-head probabilities, CLS-head-only probabilities, the CLS row's rollout grid) for these bytes."""
    model, meta = load_artifact(artifact, "cpu")
    images = prepare(data, meta.preprocessing, 10**9).tensor[None]  # (3, S, S) -> (1, 3, S, S)
    with torch.inference_mode():
        cls_logits, dist_logits = model.forward_train(images)
        _, attentions = model.forward_with_attention(images)
    averaged = ((cls_logits + dist_logits) / 2).softmax(-1)[0]
    method = SERVICE_METHODS[DEFAULT_METHOD]  # the map the service draws by default
    grid = attention_rollout(attentions, method.head_fusion, method.discard_ratio, num_prefix_tokens=2)[0]  # CLS row
    return averaged, cls_logits.softmax(-1)[0], grid


async def test_a_distilled_artifact_is_served_with_averaged_heads_and_the_cls_heatmap(distilled_artifact: Path):
    data = png_bytes(7)
    averaged, cls_only, expected_grid = what_the_model_says(distilled_artifact, data)
    assert (averaged - cls_only).abs().max() > 1e-3  # the heads disagree: serving one of them would show
    async with running_app(make_settings(distilled_artifact)) as (client, service):
        assert service.models.ready, service.models.message
        response = await client.post(
            "/classify", files={"file": ("x.png", data, "image/png")}, params={"heatmap": "true", "top_k": 37}
        )
        plain = await client.post("/classify", content=data, headers={"Content-Type": "image/png"})
        info = (await client.get("/v1/model")).json()
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    scores = torch.zeros(37)
    for p in result["predictions"]:
        scores[p["index"]] = p["score"]
    torch.testing.assert_close(scores, averaged, rtol=1e-5, atol=1e-6)
    grid = np.array(result["heatmap"]["grid"])
    assert grid.shape == (4, 4)  # 16 patches: neither special token is in the map
    np.testing.assert_allclose(grid, expected_grid.numpy(), rtol=1e-4, atol=1e-5)
    [fast] = plain.json()["results"]  # the SDPA path answers as the heatmap path does
    assert [p["index"] for p in fast["predictions"]] == [p["index"] for p in result["predictions"][:5]]
    assert info["name"] == "petvit-tiny-distilled"


async def test_a_convnet_teacher_is_refused_with_a_message(tmp_path: Path):
    teacher = save_convnet_artifact(build_convnet("resnet18", 37, "random", 32), tmp_path / "t.safetensors", {})
    async with running_app(make_settings(teacher)) as (client, service):
        ready = await client.get("/readyz")
        assert service.models.status == "failed" and ready.status_code == 503
    message = ready.json()["error"]["message"]
    assert "torchvision resnet18 network, not a ViT" in message and "--recipe distill --teacher" in message
    assert "Traceback" not in message
