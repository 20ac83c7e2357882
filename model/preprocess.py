"""Upload bytes -> a checked, upright RGB image -> the model's uint8 (3, S, S) crop: what the service and
`petvit predict` feed a Classifier (model/inference.py).

What is wrong with an upload is an ImageRejected, whose `code` names the kind (the service answers each with its own
HTTP status: app/errors.py). The service runs this in a thread pool (PIL releases the GIL while decoding). Cheap
checks come first: the pixel count is read from the header before any pixel is decoded, so a 30 kB PNG that inflates
to 2 GB is refused (image_too_large) without allocating it. Normalisation is not done here: the model does it on
its device (uint8 is 4x fewer bytes to move).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.artifact import Preprocessing

# Formats we decode. Anything else PIL happens to recognise (PSD, ICO, EPS through Ghostscript, ...) is refused:
# each extra decoder is extra attack surface, and none is how people send photos of pets.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageRejected(ValueError):
    """An upload the model cannot take: `code` is "undecodable_image" (damaged, empty, not an image),
    "image_too_large" (too many pixels) or "unsupported_media_type" (a format we do not read); the message says
    what to send instead."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bad_image(message: str) -> ImageRejected:
    return ImageRejected("undecodable_image", message)


def image_too_large(message: str) -> ImageRejected:
    return ImageRejected("image_too_large", message)


def unsupported_type(message: str) -> ImageRejected:
    return ImageRejected("unsupported_media_type", message)


@dataclass(frozen=True)
class DeferredJpeg:
    """A JPEG whose header passed open_checked but whose pixels are left for the model's device to decode, in a
    batch, on the inference thread (app/gpu_decode.py): its bytes and what the CPU path would have done to them."""

    data: bytes
    orientation: int  # EXIF orientation, 1 (as stored) .. 8; the GPU decoder ignores EXIF, so gpu_decode applies it
    size: tuple[int, int]  # (width, height) of the full-resolution upload after that orientation


@dataclass
class PreparedImage:
    tensor: torch.Tensor | None  # (3, S, S) uint8, what the model sees; None only while `deferred` is set
    size: tuple[int, int]  # (width, height) of the upload after EXIF rotation: the heatmap overlay's size
    crop_box: tuple[float, float, float, float]  # the model's crop in upload pixels (left, top, right, bottom)
    image: Image.Image | None  # the decoded RGB image (maybe draft-reduced), kept only on request (CLI)
    deferred: DeferredJpeg | None = None  # a JPEG the inference thread decodes on the model's device instead

    @property
    def pixels(self) -> torch.Tensor | DeferredJpeg:
        """What the batcher queues for this image: the decoded crop, or the JPEG to decode on the device."""
        if self.deferred is not None:
            return self.deferred
        assert self.tensor is not None
        return self.tensor


def _known_unsupported_format(data: bytes) -> str | None:
    """Formats people send that PIL cannot identify (an iPhone's HEIC above all): they deserve 415 "not a type we
    read", not 400 "damaged"."""
    if data[4:8] == b"ftyp":  # ISO base media file: HEIC/HEIF photos, also MP4/MOV video; the brand says which
        return data[8:12].decode("latin-1").strip().upper() or "ISO media"
    head = data[:1024].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its header and enforce the pixel limit before decoding anything."""
    if not data:
        raise bad_image("the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise image_too_large(f"the image has too many pixels; the limit is {max_pixels}") from None
    except UnidentifiedImageError:
        if (kind := _known_unsupported_format(data)) is not None:
            raise unsupported_type(f"{kind} files are not accepted; send JPEG, PNG, WebP, GIF, BMP or TIFF") from None
        raise bad_image("the upload is not an image we can decode (send JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except Exception as err:  # truncated headers raise assorted errors inside PIL's plugins
        raise bad_image(f"the image header is damaged: {err}") from None
    if image.format not in ALLOWED_FORMATS:
        raise unsupported_type(f"{image.format} images are not accepted; send JPEG, PNG, WebP, GIF, BMP or TIFF")
    width, height = image.size
    if width * height > max_pixels:
        raise image_too_large(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white (transparent pixels' colours are arbitrary,
    often black, and would otherwise show through); 16- and 32-bit greys are scaled, not clipped at 255."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            peak = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
            values = values * (255.0 / peak)
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in 0..1
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode(data: bytes, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (upright RGB image, upright (width, height) of the full-resolution upload).

    JPEGs decode at the smallest DCT scale that still covers draft_size, so the image may be smaller than the size.
    """
    image = open_checked(data, max_pixels)
    width, height = image.size
    try:
        # EXIF orientations 5..8 turn the picture by 90 degrees, swapping its sides.
        upright = (height, width) if image.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF / WebP / APNG: the first frame stands for the image
        if draft_size and image.format in ("JPEG", "MPO"):
            # draft() picks a 1/2, 1/4 or 1/8 scale whose result is still >= the request in both sides, so the
            # shorter side stays >= resize_size: same crop, far less decoding for phone photos.
            image.draft("RGB", (draft_size, draft_size))
        image = ImageOps.exif_transpose(image)  # also loads the pixels
        return to_rgb(image), upright
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        raise image_too_large(f"the image has too many pixels; the limit is {max_pixels}") from None
    except Exception as err:  # truncated or corrupt data fails while loading, with assorted error types
        raise bad_image(f"the image data is corrupt or truncated: {err}") from None


def _resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shorter`, the longer one scales and is truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def crop_box(width: int, height: int, pre: Preprocessing) -> tuple[float, float, float, float]:
    """The centre crop in (width, height) pixels that the artifact's resize + centre crop keeps, with torchvision's
    rounding (Resize truncates the longer side, CenterCrop rounds its offsets) so serving sees the pixels the
    evaluation (training.data.eval_transform) saw. A resize_size below image_size (odd metadata) resizes to
    image_size instead: the crop never leaves the image. A squash policy with resize_size = image_size (Hugging
    Face's ViT processor) keeps the whole upload."""
    side = pre.image_size
    (resized_w, resized_h), (left, top) = resized_crop(width, height, pre)
    sx, sy = width / resized_w, height / resized_h  # resized pixels -> upload pixels
    return left * sx, top * sy, (left + side) * sx, (top + side) * sy


def resized_crop(width: int, height: int, pre: Preprocessing) -> tuple[tuple[int, int], tuple[int, int]]:
    """The same geometry in the resized image's own pixels: ((resized width, height), (crop left, top)), the crop
    being image_size square. The GPU path resizes whole images with it when that is small (app/gpu_decode.py)."""
    side = pre.image_size
    target = max(pre.resize_size, side)
    if pre.resize_mode == "squash":
        resized_w, resized_h = target, target  # both sides, whatever the aspect ratio
    else:
        resized_w, resized_h = _resized_size(width, height, target)
    return (resized_w, resized_h), (round((resized_w - side) / 2), round((resized_h - side) / 2))


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag as ImageOps.exif_transpose reads it; 1 (as stored) when absent or not 2..8."""
    value = image.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def defer_jpeg(data: bytes, pre: Preprocessing, max_pixels: int) -> DeferredJpeg | None:
    """The upload as a DeferredJpeg when the GPU decoder should take it, else None (decode it here instead).

    open_checked runs first, exactly as on the CPU path: format allow-list and pixel limit from the header, so an
    oversize or unsupported upload is refused (413/415/400) before any pixel is decoded anywhere. Only the
    RGB and greyscale JPEGs whose stream looks complete are deferred: CMYK/YCCK (Adobe's inverted CMYK) and truncated
    streams are left to PIL, the reference, because what nvJPEG makes of them could not be checked without a GPU,
    and a truncated file must stay a 400 (PIL refuses it; a lenient decoder might return a half-grey picture).
    """
    header = open_checked(data, max_pixels)
    if header.format not in ("JPEG", "MPO") or header.mode not in ("RGB", "L"):
        return None
    # Entropy-coded data never holds FF D9 (EOI) or FF DA (SOS): 0xFF is byte-stuffed there. An EOI after the last
    # scan's start means the stream was not cut short; MPO's appended frames end with their own EOI.
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return None
    try:
        orientation = _exif_orientation(header)
    except Exception:  # a damaged EXIF block: the CPU path decides what that means
        return None
    width, height = header.size
    size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 5..8 turn it by 90 degrees
    return DeferredJpeg(data, orientation, size)


def prepare(
    data: bytes, pre: Preprocessing, max_pixels: int, keep_image: bool = False, defer: bool = False
) -> PreparedImage:
    """The whole pipeline for one upload; raises ImageRejected for what is wrong with it.

    defer=True (PETVIT_GPU_DECODE on) checks a JPEG's header here and leaves its pixels to the model's device
    (`PreparedImage.deferred`); every other upload takes the CPU path below, unchanged.
    """
    if defer and (deferred := defer_jpeg(data, pre, max_pixels)) is not None:
        return PreparedImage(None, deferred.size, crop_box(*deferred.size, pre), None, deferred)
    image, original = decode(data, max_pixels, draft_size=pre.resize_size)
    # Resample only the crop's box: PIL samples the same positions with the same filter width as when it resizes
    # the whole image and crops that, without the whole resized image, which for an extreme aspect ratio is
    # enormous (100000x1 -> 25.6M x 256 pixels, 20 GB: one request took the server down).
    width, height = image.size
    left, top, right, bottom = crop_box(width, height, pre)
    box = (max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom))  # float rounding
    size = (pre.image_size, pre.image_size)
    crop = image.resize(size, _RESAMPLE.get(pre.interpolation, Image.Resampling.BILINEAR), box=box)
    # (S, S, 3) HWC uint8 -> (3, S, S) CHW, the layout the model takes
    tensor = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return PreparedImage(tensor, original, crop_box(*original, pre), image if keep_image else None)
