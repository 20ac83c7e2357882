"""Phone photos: the heatmap overlay PNG is capped at OVERLAY_MAX_SIDE on its longer side, keeping the upload's
shape and the crop box's place in it, so a 12 MP upload's answer stays small; heatmap_png=false sends the grid only."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.overlay import OVERLAY_MAX_SIDE, capped_geometry, overlay_png, render_overlay
from model.preprocess import Preprocessing, crop_box

PHONE = (4032, 3024)  # a 12 MP phone photo, landscape
RAW = {"Content-Type": "image/jpeg"}


def phone_jpeg(size: tuple[int, int] = PHONE) -> bytes:
    """A smooth gradient photo at `size` (compresses like a photo, not like noise), JPEG quality 90."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w, dtype=np.float32), np.linspace(0, 255, h, dtype=np.float32))
    pixels = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)  # (h, w, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize(
    ("size", "capped"),
    [(PHONE, (512, 384)), ((3024, 4032), (384, 512)), ((500, 375), (500, 375)), ((512, 100), (512, 100))],
)
def test_the_overlay_png_is_capped_on_its_longer_side_and_keeps_the_shape(size, capped) -> None:
    box = crop_box(*size, Preprocessing(224, 256))
    assert png_size(overlay_png(torch.rand(14, 14), size, box)) == capped


def test_the_crop_box_scales_with_the_image() -> None:
    box = crop_box(*PHONE, Preprocessing(224, 256))
    size, scaled = capped_geometry(PHONE, box, OVERLAY_MAX_SIDE)
    assert size == (512, 384)
    np.testing.assert_allclose(scaled, np.array(box) * 512 / 4032)
    assert capped_geometry(PHONE, box, None) == (PHONE, box)


def test_the_capped_overlay_is_the_full_size_one_scaled_down() -> None:
    """Same heat at the same relative place: the full-size overlay resized to 512x384 matches the capped one up to
    resampling at the box's edge (mean alpha-weighted difference of a few levels)."""
    box = crop_box(*PHONE, Preprocessing(224, 256))
    grid = torch.zeros(14, 14)
    grid[3, 10] = 1.0  # one hot cell, up and to the right
    small = np.asarray(Image.open(io.BytesIO(overlay_png(grid, PHONE, box))).convert("RGBA"), dtype=np.float32)
    full = render_overlay(grid, PHONE, box).convert("RGBA").resize((512, 384), Image.Resampling.BILINEAR)
    full_px = np.asarray(full, dtype=np.float32)
    assert np.abs(small - full_px).mean() < 3.0
    hottest = np.unravel_index(small[..., 3].argmax(), small.shape[:2])  # most opaque pixel = the hot cell
    left, top, _, bottom = np.array(box) * 512 / 4032
    cell = (bottom - top) / 14
    assert top + 3 * cell - 1 <= hottest[0] <= top + 4 * cell + 1
    assert left + 10 * cell - 1 <= hottest[1] <= left + 11 * cell + 1


async def test_a_phone_photo_answers_with_a_512_px_overlay_and_a_small_body(client) -> None:
    """A 4032x3024 upload: the PNG is 512x384 (was the upload's size: 1.38 MB of PNG, 1.84 MB of answer), the whole
    answer a few tens of kB; the grid alone is smaller still and the same grid."""
    data = phone_jpeg()
    with_png = await client.post("/classify", content=data, headers=RAW, params={"heatmap": "true"})
    assert with_png.status_code == 200, with_png.text
    [result] = with_png.json()["results"]
    assert (result["width"], result["height"]) == PHONE
    png = base64.b64decode(result["heatmap"]["png"])
    assert png_size(png) == (512, 384)
    assert len(png) < 100_000
    assert len(with_png.content) < 150_000
    grid_only = await client.post(
        "/classify", content=data, headers=RAW, params={"heatmap": "true", "heatmap_png": "false"}
    )
    assert grid_only.status_code == 200, grid_only.text
    [plain] = grid_only.json()["results"]
    assert plain["heatmap"]["png"] is None
    assert plain["heatmap"]["grid"] == result["heatmap"]["grid"]
    assert len(grid_only.content) < len(with_png.content) - len(png)
