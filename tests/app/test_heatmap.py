"""model/overlay.py: the transparent overlay (heat over the crop, veil outside, no photo) and the CLI's composition."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from model.overlay import compose, overlay_png, overlay_png_base64, render_overlay
from model.preprocess import Preprocessing, crop_box

SIZE = (500, 375)  # a typical upload, landscape
# b16/b32's crop (224/256 of the shorter side): a 328.1 px square in the middle. Fixed here rather than taken from
# crop_box, whose torchvision rounding moves it by a fraction of a pixel: these tests are about rendering a box.
BOX = (85.9375, 23.4375, 414.0625, 351.5625)
VEIL = (0, 0, 0, 140)  # black at 55% opacity
COLDEST = (0, 0, 4, 76)  # the ramp's first colour at 30% opacity
HOTTEST = (252, 255, 164, 178)  # the ramp's last colour at 70% opacity
MIDDLE = (186, 57, 82, 128)  # heat 0.5: the ramp's middle, a crimson, at 50% opacity


def planted_grid() -> torch.Tensor:
    """7x7 (b32's grid), cold everywhere but a hot cell at row 2, column 5 and a warm one at row 5, column 1."""
    grid = torch.zeros(7, 7)
    grid[2, 5] = 1.0
    grid[5, 1] = 0.5
    return grid


def cell_centre(row: int, col: int, box=BOX, cells: int = 7) -> tuple[int, int]:
    left, top, right, bottom = box
    return int(left + (col + 0.5) * (right - left) / cells), int(top + (row + 0.5) * (bottom - top) / cells)


def rgba(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"))


def crop_mask(size=SIZE, box=BOX) -> np.ndarray:
    left, top, right, bottom = (round(v) for v in box)
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_overlay_is_the_uploads_size_with_the_veil_outside_the_crop():
    overlay = render_overlay(planted_grid(), SIZE, BOX)
    assert overlay.size == SIZE and overlay.mode == "P"
    pixels, inside = rgba(overlay), crop_mask()
    assert np.allclose(BOX, (85.94, 23.44, 414.06, 351.56), atol=0.01)
    assert inside.sum() == 328 * 329  # the box rounded to whole pixels: columns 86..413, rows 23..351
    assert (pixels[~inside] == VEIL).all()  # side strips and thin bands above and below
    # Inside: heat colours, never the veil, never opaque, never fully transparent.
    alpha = pixels[inside][:, 3]
    assert alpha.min() == COLDEST[3] and HOTTEST[3] - 2 <= alpha.max() <= HOTTEST[3]


def test_colours_follow_the_grid():
    pixels = rgba(render_overlay(planted_grid(), SIZE, BOX))
    # Cell centres carry their cell's value, to within the bilinear sampling's fraction of a pixel (a level or two of
    # the ramp; its yellow end is steep in blue).
    x, y = cell_centre(2, 5)
    assert np.abs(pixels[y, x].astype(int) - HOTTEST).max() <= 6  # the hot cell: the ramp's top, pale yellow
    x, y = cell_centre(0, 0)
    assert tuple(pixels[y, x]) == COLDEST  # a cold cell far from both: the ramp's bottom, near black
    x, y = cell_centre(5, 1)
    assert np.abs(pixels[y, x].astype(int) - MIDDLE).max() <= 6

    # The brightest, most opaque and most yellow pixel of the overlay lies in the hot cell's square.
    inside = crop_mask()
    brightness = np.where(inside, pixels[..., :3].astype(int).sum(-1), -1)
    y, x = np.unravel_index(brightness.argmax(), brightness.shape)
    left, top, right, bottom = BOX
    assert (int((y - top) * 7 / (bottom - top)), int((x - left) * 7 / (right - left))) == (2, 5)
    assert pixels[y, x, 3] >= HOTTEST[3] - 2
    # Heat falls off smoothly (bilinear): halfway between the hot cell's centre and its cold neighbour's.
    (x0, y0), (x1, _) = cell_centre(2, 5), cell_centre(2, 6)
    between = pixels[y0, (x0 + x1) // 2]
    assert COLDEST[3] < between[3] < HOTTEST[3]


def test_png_is_a_palette_png_with_transparency_that_decodes_to_the_overlay():
    grid = planted_grid()
    data = overlay_png(grid, SIZE, BOX)
    assert data.startswith(b"\x89PNG") and b"tRNS" in data
    png = Image.open(io.BytesIO(data))
    assert png.format == "PNG" and png.size == SIZE and png.mode == "P"
    assert isinstance(png.info["transparency"], bytes)  # per-entry alpha
    assert (rgba(png) == rgba(render_overlay(grid, SIZE, BOX))).all()
    assert base64.b64decode(overlay_png_base64(grid, SIZE, BOX)) == data
    # Smooth heat and a flat veil compress well: a 500x375 overlay is well under a tenth of its RGBA bytes.
    assert len(data) < 500 * 375 * 4 / 10


def test_portrait_and_a_crop_box_beyond_the_image():
    size = (40, 90)
    box = crop_box(*size, Preprocessing(32, 37))
    pixels = rgba(render_overlay(torch.full((4, 4), 0.5), size, box))
    assert pixels.shape == (90, 40, 4)
    assert (pixels[crop_mask(size, box)] == MIDDLE).all()
    assert (pixels[~crop_mask(size, box)] == VEIL).all()
    # A crop box that misses the image entirely (never from crop_box, but render must not fail): all veil.
    assert (rgba(render_overlay(torch.ones(4, 4), size, (100, 100, 200, 200))) == VEIL).all()


def test_compose_lays_the_overlay_over_the_photo():
    photo = Image.new("RGB", (250, 188), (200, 100, 50))  # half size, as a draft-decoded JPEG can be
    overlay = render_overlay(planted_grid(), SIZE, BOX)
    picture = compose(photo, overlay)
    assert picture.mode == "RGB" and picture.size == SIZE
    pixels = np.asarray(picture).astype(int)
    # Outside the crop: the photo darkened by the veil (alpha 140/255: 45% of its brightness is left).
    assert np.abs(pixels[5, 5] - [90, 45, 23]).max() <= 1
    # Inside: the heat colour at its opacity over the photo, e.g. ~70% pale yellow at the hot cell's centre and 30%
    # near-black at a cold cell's.
    heat = rgba(overlay).astype(float)
    for row, col, near in ((2, 5, [236, 209, 130]), (0, 0, [140, 70, 36])):
        x, y = cell_centre(row, col)
        a = heat[y, x, 3] / 255
        assert np.abs(pixels[y, x] - ((1 - a) * np.array([200, 100, 50]) + a * heat[y, x, :3])).max() <= 1
        assert np.abs(pixels[y, x] - near).max() <= 4
