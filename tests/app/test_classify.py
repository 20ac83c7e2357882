"""POST /classify: upload shapes, top_k, heatmaps, every PIL mode, and agreement with the model itself."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from model.artifact import load_artifact
from model.overlay import OVERLAY_MAX_SIDE
from model.preprocess import crop_box

from .fixtures import assert_matches_model, direct_probs, encode, make_settings, noise_image, png_bytes, running_app


async def test_one_multipart_image_matches_the_models_direct_output(client, tiny_artifact, chelsea):
    data = encode(chelsea)
    response = await client.post("/classify", files={"file": ("chelsea.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "petvit-tiny-test"
    [result] = body["results"]
    assert (result["filename"], result["width"], result["height"]) == ("chelsea.jpg", 451, 300)
    assert len(result["predictions"]) == 5
    scores = [p["score"] for p in result["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert_matches_model(result, direct_probs(tiny_artifact, data), 5)
    assert result["heatmap"] is None
    assert result["timings"]["batch_size"] >= 1 and result["timings"]["inference_ms"] > 0


async def test_many_images_answer_in_upload_order(client, tiny_artifact):
    images = [png_bytes(seed) for seed in range(5)]
    files = [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = await client.post("/classify", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [f"img{i}.png" for i in range(5)]
    for result, data in zip(results, images, strict=True):
        assert_matches_model(result, direct_probs(tiny_artifact, data), 3)


async def test_raw_image_body(client, tiny_artifact):
    data = png_bytes(7)
    response = await client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["filename"] is None
    assert_matches_model(result, direct_probs(tiny_artifact, data), 5)


@pytest.mark.parametrize("top_k", [1, 37])
async def test_top_k_bounds_are_accepted(client, top_k):
    response = await client.post(
        "/classify", params={"top_k": top_k}, content=png_bytes(1), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    predictions = response.json()["results"][0]["predictions"]
    assert len(predictions) == top_k
    if top_k == 37:
        assert sorted(p["index"] for p in predictions) == list(range(37))
        assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("top_k", [0, 38, -1])
async def test_top_k_out_of_range_is_422(client, top_k):
    response = await client.post(
        "/classify", params={"top_k": top_k}, content=png_bytes(1), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_parameters"
    assert "top_k" in response.json()["error"]["message"]


async def test_heatmap_grid_and_png_at_the_uploads_size(client, chelsea, tiny_artifact):
    small = noise_image(3, (40, 90))  # portrait: checks width/height are not swapped
    files = [
        ("file", ("cat.jpg", encode(chelsea), "image/jpeg")),
        ("file", ("tall.png", encode(small, "PNG"), "image/png")),
    ]
    response = await client.post("/classify", files=files, params={"heatmap": "true", "top_k": 2})
    assert response.status_code == 200, response.text
    pre = load_artifact(tiny_artifact, "cpu")[1].preprocessing
    assert (pre.image_size, pre.resize_size) == (32, 37)
    for result, size in zip(response.json()["results"], [(451, 300), (40, 90)], strict=True):
        heatmap = result["heatmap"]
        grid = np.array(heatmap["grid"])
        assert grid.shape == (4, 4) == (heatmap["rows"], heatmap["cols"])  # tiny model: 32 px / 8 px patches
        assert grid.min() >= 0 and grid.max() <= 1 and grid.max() == pytest.approx(1.0)
        png = Image.open(io.BytesIO(base64.b64decode(heatmap["png"])))
        assert png.format == "PNG" and png.size == size
        assert png.mode == "P" and isinstance(png.info["transparency"], bytes)  # palette + tRNS: RGBA when decoded
        pixels = np.asarray(png.convert("RGBA")).astype(int)
        assert pixels.shape == (size[1], size[0], 4)
        assert_overlay_follows_the_grid(pixels, grid, crop_box(*size, pre))
        assert result["timings"]["heatmap_ms"] > 0


def bilinear(grid: np.ndarray, y: float, x: float) -> float:
    """The grid's bilinear value at pixel (y, x) of a box of grid.shape cells, pixel-centre aligned, edges clamped
    (align_corners=False: what an image resize of the grid gives at that pixel), in box pixels per cell units."""
    rows, cols = grid.shape
    sy, sx = np.clip(y - 0.5, 0, rows - 1), np.clip(x - 0.5, 0, cols - 1)  # cell-centre coordinates
    r0, c0 = int(sy), int(sx)
    r1, c1 = min(r0 + 1, rows - 1), min(c0 + 1, cols - 1)
    fy, fx = sy - r0, sx - c0
    top = grid[r0, c0] * (1 - fx) + grid[r0, c1] * fx
    bottom = grid[r1, c0] * (1 - fx) + grid[r1, c1] * fx
    return float(top * (1 - fy) + bottom * fy)


def assert_overlay_follows_the_grid(pixels: np.ndarray, grid: np.ndarray, box: tuple[float, ...]) -> None:
    """A transparent overlay, not a picture: the veil (black, alpha 140) outside the model's crop; inside it, heat
    colours that are brightest and most opaque where the grid is hottest."""
    height, width = pixels.shape[:2]
    left, top, right, bottom = (round(v) for v in box)
    inside = np.zeros((height, width), dtype=bool)
    inside[max(top, 0) : bottom, max(left, 0) : right] = True
    if (~inside).any():
        assert (pixels[~inside] == (0, 0, 0, 140)).all()
    alpha = pixels[inside][:, 3]
    assert alpha.min() >= 76 and alpha.max() <= 178  # 30%..70%: the photo always shows through
    rows, cols = grid.shape
    points = [
        (int(top + (r + 0.5) * (bottom - top) / rows), int(left + (c + 0.5) * (right - left) / cols))
        for r in range(rows)
        for c in range(cols)
    ]
    centres = [pixels[y, x] for y, x in points]
    # The heat the overlay should show at each sampled pixel: the grid, bilinearly upsampled. A pixel near a cell's
    # centre is not exactly on it, so next to a much colder cell (a peaked heatmap, small cells) it shows a little
    # less than the cell's own value: 5% of the difference for the 10 px cells of a 40 px crop.
    expected = [
        bilinear(grid, (y + 0.5 - top) * rows / (bottom - top), (x + 0.5 - left) * cols / (right - left))
        for y, x in points
    ]
    hottest = int(grid.argmax())
    brightness = [int(p[:3].sum()) for p in centres]
    assert brightness[hottest] == max(brightness)  # the hottest cell's square is the brightest and most yellow
    assert centres[hottest][3] == max(p[3] for p in centres)
    if expected[hottest] >= 0.98:
        assert centres[hottest][0] >= 240 and centres[hottest][1] >= 230  # yellow: red and green near full
    # Colour and opacity rise with the grid: each centre's alpha is its heat on the 30%..70% ramp.
    np.testing.assert_allclose([p[3] for p in centres], 255 * (0.30 + 0.40 * np.array(expected)), atol=4)


async def test_heatmap_and_plain_requests_get_the_same_predictions(client):
    data = png_bytes(11)
    plain = await client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    with_map = await client.post(
        "/classify", content=data, headers={"Content-Type": "image/png"}, params={"heatmap": True}
    )
    a, b = plain.json()["results"][0]["predictions"], with_map.json()["results"][0]["predictions"]
    assert [p["index"] for p in a] == [p["index"] for p in b]
    np.testing.assert_allclose([p["score"] for p in a], [p["score"] for p in b], rtol=1e-4, atol=1e-6)


def _mode_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 56), dtype=np.uint8)))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [noise_image(s, (56, 40)) for s in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    i16 = Image.fromarray((rng.integers(0, 65536, (40, 56))).astype(np.uint16))
    return {
        "L": encode(rgb.convert("L"), "PNG"),
        "LA": encode(rgb.convert("LA"), "PNG"),
        "P+transparency": encode(palette, "PNG"),
        "RGBA": encode(rgba, "PNG"),
        "CMYK": encode(rgb.convert("CMYK"), "JPEG"),
        "I;16": encode(i16, "PNG"),
        "animated GIF": animated.getvalue(),
        "WebP": encode(rgb, "WEBP"),
        "1": encode(rgb.convert("1"), "BMP"),
    }


MODE_IMAGES = _mode_images()


@pytest.mark.parametrize("mode", list(MODE_IMAGES))
async def test_every_pil_mode_is_classified(client, tiny_artifact, mode):
    data = MODE_IMAGES[mode]
    response = await client.post("/classify", files={"file": (f"{mode}.img", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert (result["width"], result["height"]) == (56, 40)
    assert_matches_model(result, direct_probs(tiny_artifact, data), 5)


async def test_heatmap_grid_without_png(client):
    response = await client.post(
        "/classify",
        content=png_bytes(4),
        headers={"Content-Type": "image/png"},
        params={"heatmap": "true", "heatmap_png": "false"},
    )
    assert response.status_code == 200
    heatmap = response.json()["results"][0]["heatmap"]
    assert heatmap["png"] is None and np.array(heatmap["grid"]).shape == (4, 4)
    assert np.array(heatmap["grid"]).max() == pytest.approx(1.0)


@pytest.mark.parametrize("size", [(1, 1), (100_000, 1), (1, 100_000)])
async def test_degenerate_sizes_are_classified_with_an_overlay_of_their_shape(client, size):
    data = encode(Image.new("RGB", size, (200, 120, 40)), "PNG")
    response = await client.post("/classify", files={"file": ("odd.png", data, "image/png")}, params={"heatmap": 1})
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert (result["width"], result["height"]) == size and len(result["predictions"]) == 5
    # The overlay keeps the upload's shape, its longer side capped at OVERLAY_MAX_SIDE (512): 100000x1 -> 512x1.
    capped = tuple(min(side, OVERLAY_MAX_SIDE) for side in size)
    assert Image.open(io.BytesIO(base64.b64decode(result["heatmap"]["png"]))).size == capped


async def test_a_default_top_k_above_the_label_count_gives_every_label(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, default_top_k=50)) as (client, _):
        response = await client.post("/classify", content=png_bytes(1), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text  # was 422 "top_k ... got 50" for a request without top_k
    assert len(response.json()["results"][0]["predictions"]) == 37
