"""Rollout grid -> a PNG overlay on the uploaded photo, at the upload's own size.

The model saw only the centre crop, so the heat is drawn over that square and the rest of the photo is dimmed:
the picture tells the truth about what the model looked at.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

# A perceptually ordered dark-blue -> magenta -> orange -> yellow ramp (close to matplotlib's "inferno"),
# built from anchors so the service needs no matplotlib import.
_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]],
    dtype=np.float32,
)  # fmt: skip
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)  # (256, 3)

HEAT_ALPHA = 0.55  # how much colour covers the crop; the photo stays readable underneath
OUTSIDE_DIM = 0.45  # brightness kept outside the crop the model saw
_DIM = [round(v * OUTSIDE_DIM) for v in range(256)] * 3  # point table for all three channels
_LUT_CHANNELS = [_LUT[:, c].tolist() for c in range(3)]


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) floats in [0, 1] -> (H, W, 3) uint8 colours."""
    return _LUT[np.clip(np.rint(heat * 255), 0, 255).astype(np.uint8)]


def render_overlay(
    image: Image.Image,
    grid: torch.Tensor,
    size: tuple[int, int],
    crop_box: tuple[float, float, float, float],
) -> Image.Image:
    """The photo at `size` (width, height), dimmed outside crop_box, with the grid's heat blended over the crop.

    All pixel work is PIL's uint8 C code (point tables, bilinear resize, blend): float numpy over a full-size photo
    cost several times more per heatmap.
    """
    width, height = size
    base = image.convert("RGB")
    if base.size != size:
        base = base.resize(size, Image.Resampling.BILINEAR)  # a draft-decoded JPEG comes back to full size
    left, top, right, bottom = (round(v) for v in crop_box)
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    out = base.point(_DIM)
    if right > left and bottom > top:
        cells = np.clip(np.rint(grid.float().numpy() * 255), 0, 255).astype(np.uint8)  # (rows, cols) in 0..255
        heat = Image.fromarray(cells, mode="L").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        colored = Image.merge("RGB", [heat.point(_LUT_CHANNELS[c]) for c in range(3)])
        region = Image.blend(base.crop((left, top, right, bottom)), colored, HEAT_ALPHA)
        out.paste(region, (left, top))
    return out


def overlay_png(
    image: Image.Image, grid: torch.Tensor, size: tuple[int, int], crop_box: tuple[float, float, float, float]
) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: a few percent bigger than the default 6 and several times faster to encode.
    render_overlay(image, grid, size, crop_box).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def overlay_png_base64(
    image: Image.Image, grid: torch.Tensor, size: tuple[int, int], crop_box: tuple[float, float, float, float]
) -> str:
    return base64.b64encode(overlay_png(image, grid, size, crop_box)).decode("ascii")
