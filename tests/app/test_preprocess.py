"""Preprocessing details the API tests can't see: EXIF rotation, JPEG draft, mode conversions, crop geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from app.errors import rejected_image
from model.preprocess import ImageRejected, Preprocessing, crop_box, decode, prepare, to_rgb
from training.data import eval_transform, resize_size_for

from .fixtures import encode

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
    # torchvision's geometry: 100x50 -> 74x37, crop offsets round(21.0) = 21 and round(2.5) = 2, back in upload pixels
    assert crop_box(100, 50, PRE) == pytest.approx((21 * 100 / 74, 2 * 50 / 37, 53 * 100 / 74, 34 * 50 / 37))


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (64, 48), (37, 37), (121, 80)])
def test_preprocessing_matches_the_models_evaluation_transform(size):
    """Serving must feed the model the pixels its evaluation did (training.data.eval_transform), not a crop shifted by
    half a pixel: same resized size, same crop offsets; PIL's and torch's resamplers differ by a grey level or two
    here and there."""
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(2)  # photo-like smoothness; on pure noise a half-pixel shift still looks small
    )
    served = prepare(encode(image, "PNG"), PRE, 10**6).tensor.int()
    evaluated = eval_transform(PRE.image_size)(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)).int()
    assert resize_size_for(PRE.image_size) == PRE.resize_size
    difference = (served - evaluated).abs()
    assert difference.float().mean() < 0.1 and difference.max() <= 2


@pytest.mark.parametrize("size", [(100_000, 1), (1, 100_000), (1, 1), (5000, 3)])
def test_extreme_aspect_ratios_never_build_a_huge_intermediate_image(size, monkeypatch):
    """Resizing a 100000x1 upload's shorter side to 256 makes a 25.6M x 256 image (20 GB): one such request took the
    real server down. Only the crop's box may be resampled; no intermediate image may be bigger than a few crops."""
    real_resize = Image.Image.resize

    def bounded_resize(self, out_size, *args, **kwargs):
        assert out_size[0] * out_size[1] <= 4 * 224 * 224, f"resize to {out_size}"
        return real_resize(self, out_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    prepared = prepare(encode(Image.new("RGB", size, (10, 200, 30)), "PNG"), Preprocessing(224, 256), 10**6)
    assert tuple(prepared.tensor.shape) == (3, 224, 224) and prepared.size == size
    assert prepared.tensor[:, 112, 112].tolist() == [10, 200, 30]
    left, top, right, bottom = prepared.crop_box
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


def test_empty_upload_is_a_bad_image():
    with pytest.raises(ImageRejected) as info:
        prepare(b"", PRE, 10**6)
    assert rejected_image(info.value).status == 400
