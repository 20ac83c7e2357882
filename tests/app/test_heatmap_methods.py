"""POST /classify?heatmap_method=...: each offered method serves the model's own heatmap of that method, the default is
model.explain's, a bad name is a 422 that lists the choices, and one batch can mix methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.schemas import DEFAULT_HEATMAP_METHOD, HeatmapMethodName
from model.artifact import load_artifact
from model.explain import DEFAULT_METHOD, SERVICE_METHODS, heatmaps
from model.inference import Classifier
from model.preprocess import prepare

from .fixtures import png_bytes

RAW = {"Content-Type": "image/png"}


def direct_heatmap(artifact, data: bytes, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, grid) the model itself gives these bytes with this method, preprocessed as the artifact asks."""
    model, meta = load_artifact(artifact, "cpu")
    tensor = prepare(data, meta.preprocessing, 10**9).tensor[None]  # (1, 3, S, S) uint8
    spec = SERVICE_METHODS[method]
    with torch.inference_mode():
        logits, maps = heatmaps(model, tensor, [spec])
    return logits.softmax(-1)[0].numpy(), maps[spec.key][0].numpy()


def test_the_api_offers_exactly_the_service_methods() -> None:
    assert {m.value for m in HeatmapMethodName} == set(SERVICE_METHODS)
    assert DEFAULT_HEATMAP_METHOD.value == DEFAULT_METHOD == "rollout"


@pytest.mark.parametrize("method", [None, *SERVICE_METHODS])
async def test_each_method_serves_the_models_own_heatmap(client, tiny_artifact, method: str | None) -> None:
    data = png_bytes(21)
    params = {"heatmap": "true", "top_k": 37} | ({"heatmap_method": method} if method else {})
    response = await client.post("/classify", content=data, headers=RAW, params=params)
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    served = method or DEFAULT_METHOD
    probs, grid = direct_heatmap(tiny_artifact, data, served)
    assert result["heatmap"]["method"] == served
    np.testing.assert_allclose(np.array(result["heatmap"]["grid"]), grid, atol=1e-5)
    by_index = {p["index"]: p["score"] for p in result["predictions"]}
    np.testing.assert_allclose([by_index[i] for i in range(37)], probs, rtol=1e-4, atol=1e-6)


async def test_rollout_and_gradient_maps_differ(client) -> None:
    data = png_bytes(22)
    grids = {}
    for method in SERVICE_METHODS:
        params = {"heatmap": "true", "heatmap_method": method, "heatmap_png": "false"}
        response = await client.post("/classify", content=data, headers=RAW, params=params)
        grids[method] = np.array(response.json()["results"][0]["heatmap"]["grid"])
    assert not np.allclose(grids["rollout"], grids["gradient"], atol=1e-3)


@pytest.mark.parametrize("value", ["lrp", "ROLLOUT", "", "rollout:mean:0"])
async def test_an_unknown_method_is_a_422_listing_the_choices(client, value: str) -> None:
    params = {"heatmap": "true", "heatmap_method": value}
    response = await client.post("/classify", content=png_bytes(1), headers=RAW, params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_parameters"
    assert "heatmap_method" in error["message"] and "'rollout' or 'gradient'" in error["message"]


async def test_the_openapi_page_documents_the_choices(client) -> None:
    spec = (await client.get("/openapi.json")).json()
    [param] = [p for p in spec["paths"]["/classify"]["post"]["parameters"] if p["name"] == "heatmap_method"]
    schema = param["schema"]
    assert schema.get("default") == DEFAULT_METHOD
    names = schema.get("enum") or spec["components"]["schemas"][schema["$ref"].split("/")[-1]]["enum"]
    assert set(names) == set(SERVICE_METHODS)


def test_one_batch_can_mix_methods_and_plain_images(tiny_artifact) -> None:
    """The batcher groups requests with different methods into one batch: each image must get its own method's map."""
    predictor = Classifier.from_artifact(tiny_artifact, "cpu", "float32")
    pre = predictor.preprocessing
    images = [prepare(png_bytes(30 + i), pre, 10**9).tensor for i in range(4)]
    wants, methods = [True, True, False, True], ["gradient", "rollout", "rollout", "rollout"]
    mixed = predictor.predict(images, wants, methods)
    for image, want, method, result in zip(images, wants, methods, mixed, strict=True):
        [alone] = predictor.predict([image], [want], [method])
        torch.testing.assert_close(result.probs, alone.probs, atol=1e-6, rtol=1e-5)
        if want:
            torch.testing.assert_close(result.grid, alone.grid, atol=1e-5, rtol=1e-4)
        else:
            assert result.grid is None
