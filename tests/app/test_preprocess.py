"""Preprocessing details the API tests can't see: EXIF rotation, JPEG draft, mode conversions, crop geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.errors import ServiceError
from app.preprocess import Preprocessing, crop_box, decode, prepare, to_rgb

from .conftest import encode

PRE = Preprocessing(image_size=32, resize_size=37)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    decoded, size = decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95), 10**6)
    assert decoded.size == size == (30, 60)
    top, bottom = np.asarray(decoded)[5, 15], np.asarray(decoded)[55, 15]
    assert top[2] > 200 and bottom[0] > 200  # the blue half is now on top


def test_big_jpegs_decode_in_draft_mode_but_keep_their_size(chelsea):
    big = chelsea.resize((3608, 2400))
    prepared = prepare(encode(big), Preprocessing(224, 256), 10**8, keep_image=True)
    assert prepared.size == (3608, 2400)
    assert prepared.image.size[1] >= 256 and prepared.image.size[1] <= 600  # decoded at 1/4 or 1/8 scale
    assert tuple(prepared.tensor.shape) == (3, 224, 224)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_resize_and_centre_crop_follow_the_artifact():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (25, 0, 75, 50))  # white centre square
    prepared = prepare(encode(image, "PNG"), PRE, 10**6)
    assert tuple(prepared.tensor.shape) == (3, 32, 32) and prepared.tensor.dtype.is_floating_point is False
    assert int(prepared.tensor.float().mean()) > 240  # the crop lies inside the white square
    assert crop_box(100, 50, PRE) == pytest.approx(
        (50 - 50 * 32 / 37 / 2, 25 - 50 * 32 / 37 / 2, 50 + 50 * 32 / 37 / 2, 25 + 50 * 32 / 37 / 2)
    )


def test_empty_upload_is_a_bad_image():
    with pytest.raises(ServiceError) as info:
        prepare(b"", PRE, 10**6)
    assert info.value.status == 400
