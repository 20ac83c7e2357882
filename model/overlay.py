"""Rollout grid -> a transparent PNG overlay with the uploaded image's aspect ratio; the client lays it over the photo.

The service's PNG is capped at OVERLAY_MAX_SIDE pixels on its longer side (the upload's shape, scaled down; never
up): the heat is a bilinear upsampling of a 14x14 or so grid, so a 12 MP phone photo's full-size overlay carried no
more information than a 512 px one, at many times the render time and bytes (docs/service.md, "Heatmaps"). The
page (and any client) stretches the overlay over the photo it shows; `petvit predict` composites at full size
through render_overlay.

The overlay holds no photo pixels. Over the centre crop the model saw it carries the heat colours, more opaque
where the attention is higher; outside the crop a translucent dark veil shows what the model did not see.

It is an 8-bit palette PNG with a tRNS chunk (colour type 3): colour and alpha are both functions of the heat
level alone, so 255 heat levels + 1 veil entry describe every pixel exactly, at a quarter of RGBA's bytes. Browsers
and PIL decode it to RGBA (`Image.open(...).convert("RGBA")`); it is also several times faster to encode than
RGBA (figures: docs/service.md, "Heatmaps").
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

# Opacity of the heat over the crop: cold patches only shade the photo, hot ones cover it in yellow but leave it
# recognisable. The veil outside the crop is darker than the coldest heat, so the crop's edge is always visible.
HEAT_ALPHA = (0.30, 0.70)  # at heat 0 and at heat 1, linear in between
VEIL_ALPHA = 0.55  # black at this opacity outside the crop the model saw (the photo keeps 45% of its brightness)
VEIL_COLOR = (0, 0, 0)

# The longest side of the service's overlay PNG: past the size a screen shows a photo at, larger only costs bytes.
OVERLAY_MAX_SIDE = 512

HEAT_LEVELS = 255  # palette entries 0..254: heat 0..1; entry 255: the veil
VEIL_INDEX = HEAT_LEVELS


def _palette() -> tuple[list[int], bytes]:
    """(PLTE as a flat RGB list, tRNS alpha bytes) for the 256 palette entries."""
    levels = np.linspace(0.0, 1.0, HEAT_LEVELS)
    colors = _LUT[np.rint(levels * 255).astype(np.intp)]  # (255, 3)
    alphas = np.rint(255 * (HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * levels)).astype(np.uint8)
    rgb = np.concatenate([colors, np.array([VEIL_COLOR], dtype=np.uint8)]).reshape(-1).tolist()
    return rgb, alphas.tobytes() + bytes([round(255 * VEIL_ALPHA)])


PALETTE, TRANSPARENCY = _palette()


def _clamped_box(size: tuple[int, int], crop_box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    width, height = size
    left, top, right, bottom = (round(v) for v in crop_box)
    return max(left, 0), max(top, 0), min(right, width), min(bottom, height)


def render_overlay(
    grid: torch.Tensor, size: tuple[int, int], crop_box: tuple[float, float, float, float]
) -> Image.Image:
    """The overlay at `size` (width, height): heat over crop_box (upload pixels), the veil elsewhere.

    A mode "P" image whose palette is PALETTE and whose info["transparency"] is the per-entry alpha; convert("RGBA")
    for pixel values. All pixel work is PIL's uint8 C code: a bilinear resize of the tiny grid and a paste.
    """
    left, top, right, bottom = _clamped_box(size, crop_box)
    canvas = Image.new("L", size, VEIL_INDEX)
    if right > left and bottom > top:
        cells = np.clip(np.rint(grid.float().numpy() * (HEAT_LEVELS - 1)), 0, HEAT_LEVELS - 1).astype(np.uint8)
        heat = Image.fromarray(cells, mode="L").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        canvas.paste(heat, (left, top))
    overlay = canvas.convert("P")  # same bytes, now palette indices
    overlay.putpalette(PALETTE)
    overlay.info["transparency"] = TRANSPARENCY
    return overlay


def compose(image: Image.Image, overlay: Image.Image) -> Image.Image:
    """The photo with the overlay alpha-composited over it (RGB): what a client shows, for `petvit predict`."""
    base = image.convert("RGBA")
    if base.size != overlay.size:
        base = base.resize(overlay.size, Image.Resampling.BILINEAR)  # a draft-decoded JPEG comes back to full size
    return Image.alpha_composite(base, overlay.convert("RGBA")).convert("RGB")


def capped_geometry(
    size: tuple[int, int], crop_box: tuple[float, float, float, float], max_side: int | None
) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """(size, crop_box) scaled so the longer side is at most max_side (None: unchanged); the crop box scales with
    the image, so the heat stays over the part of the photo the model saw."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return size, crop_box
    scale = max_side / max(width, height)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    return scaled, (crop_box[0] * scale, crop_box[1] * scale, crop_box[2] * scale, crop_box[3] * scale)


def overlay_png(
    grid: torch.Tensor,
    size: tuple[int, int],
    crop_box: tuple[float, float, float, float],
    max_side: int | None = OVERLAY_MAX_SIDE,
) -> bytes:
    """The overlay as PNG bytes, at most max_side pixels on its longer side (None: the upload's own size)."""
    size, crop_box = capped_geometry(size, crop_box, max_side)
    buffer = io.BytesIO()
    # compress_level 1: level 6 or 9 saves ~15% of the bytes for 2-4x the time. Pillow writes palette rows
    # unfiltered (filter 0) and offers no choice; a hand-made "Up"-filtered IDAT measured half the bytes but the same
    # time (1.2 vs 1.5 ms at 500x375), not worth owning a PNG writer for.
    render_overlay(grid, size, crop_box).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def overlay_png_base64(
    grid: torch.Tensor,
    size: tuple[int, int],
    crop_box: tuple[float, float, float, float],
    max_side: int | None = OVERLAY_MAX_SIDE,
) -> str:
    return base64.b64encode(overlay_png(grid, size, crop_box, max_side)).decode("ascii")
