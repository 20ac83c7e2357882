"""The GPU input path: JPEG uploads decoded in batches on the model's device, right before the forward pass.

On a GPU, decoding and resizing on the CPU pool caps the service long before the model does (docs/service.md, "The
GPU input path", has the measured rates of both). With PETVIT_GPU_DECODE on:

1. the CPU pool still runs model/preprocess.open_checked on every upload (format allow-list, pixel limit from the
   header: 413/415/400 before any pixel is decoded), then leaves a plain JPEG undecoded: a DeferredJpeg with its
   bytes, EXIF orientation and upright size. Other formats take the CPU path as before;
2. the batcher queues it like any image;
3. on the inference thread, GpuDecoder.materialize decodes the batch's deferred JPEGs in one call to torchvision's
   decode_jpeg (nvJPEG on CUDA), turns each upright, and resamples the same crop box the CPU path does;
4. an image the device decoder refuses takes the CPU path right there; if that refuses it too (a corrupt file),
   its ServiceError becomes that image's result, never an exception: the batcher fails a whole batch on an exception,
   and one bad upload must not fail the other requests that share its forward pass.

The device is a parameter: with device=cpu the same code runs with torchvision's CPU decoder, which is how the tests
exercise batching, fallback and failure isolation on a machine without a GPU.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from app.errors import ServiceError, rejected_image
from app.metrics import Metrics
from model.artifact import Preprocessing
from model.preprocess import DeferredJpeg, ImageRejected, crop_box, prepare, resized_crop

log = logging.getLogger("petvit.gpu_decode")

Pixels = torch.Tensor | DeferredJpeg  # what an ImageJob carries: a (3, S, S) uint8 crop, or a JPEG to decode


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, for EXIF orientation 1..8: the transposes ImageOps.exif_transpose applies.
    decode_jpeg applies EXIF only on the CPU (apply_exif_orientation is ignored on CUDA), so we do it ourselves,
    on both devices alike."""
    if orientation == 2:
        return image.flip(-1)  # mirrored left-right
    if orientation == 3:
        return image.flip(-2, -1)  # rotated 180
    if orientation == 4:
        return image.flip(-2)  # mirrored top-bottom
    if orientation == 5:
        return image.transpose(-2, -1)  # (C, H, W) -> (C, W, H): mirrored along the main diagonal
    if orientation == 6:
        return image.rot90(-1, (-2, -1))  # (C, H, W) -> (C, W, H): turned 90 degrees clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)  # (C, H, W) -> (C, W, H): mirrored along the anti-diagonal
    if orientation == 8:
        return image.rot90(1, (-2, -1))  # (C, H, W) -> (C, W, H): turned 90 degrees counter-clockwise
    return image


# Resizing the whole upright image and cropping integer offsets from it is torchvision's eval transform, and samples
# exactly the positions PIL's resize(box=...) does on the CPU path. The resized image is a little bigger than the crop
# (1.7x for a 3:2 photo); past this many crops' worth (a panorama over ~7:1, or a 100000x1 strip, which would make a
# 20 GB image) only the crop's box is resampled, rounded to whole pixels.
WHOLE_RESIZE_MAX_CROPS = 8


def pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """The crop box in whole pixels, at least one pixel each way and inside the image. Slicing needs integers and
    interpolate has no sub-pixel offset, so the box moves by at most half an upload pixel."""
    left = min(max(0, round(box[0])), width - 1)
    top = min(max(0, round(box[1])), height - 1)
    right = max(min(width, round(box[2])), left + 1)
    bottom = max(min(height, round(box[3])), top + 1)
    return left, top, right, bottom


def _resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, *size) float32, antialiased: PIL's filters. The support widens with the downscale
    factor, so a 4000-px photo is averaged, not point-sampled; bicubic uses PIL's a = -0.5 when antialiased. float32
    because the antialiased kernels take no uint8 on CUDA."""
    mode = "bicubic" if interpolation == "bicubic" else "bilinear"  # the CPU path maps anything else to bilinear
    batch = image[None].float()  # (3, h, w) -> (1, 3, h, w): interpolate wants a batch dimension
    return F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=True)[0]  # -> (3, *size)


def crop_resize(image: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """(3, H, W) uint8 upright image -> the model's (3, S, S) uint8 crop, on the image's device, with the CPU path's
    geometry (model/preprocess.resized_crop / crop_box). One rounding at the end, where PIL rounds to uint8 after each
    of its two passes: the main source of the one-level differences docs/service.md lists."""
    height, width = image.shape[-2], image.shape[-1]
    side = pre.image_size
    (resized_w, resized_h), (left, top) = resized_crop(width, height, pre)
    if resized_w * resized_h <= WHOLE_RESIZE_MAX_CROPS * side * side:
        resized = _resize(image, (resized_h, resized_w), pre.interpolation)
        crop = resized[:, top : top + side, left : left + side]  # (3, h', w') -> (3, S, S)
    else:
        box_left, box_top, box_right, box_bottom = pixel_box(crop_box(width, height, pre), width, height)
        crop = _resize(image[:, box_top:box_bottom, box_left:box_right], (side, side), pre.interpolation)
    return crop.round().clamp(0, 255).to(torch.uint8).contiguous()


def decode_jpegs(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> (3, H, W) uint8 RGB tensors as stored (no EXIF) on `device`; None where the decoder refused.

    One batched call first (nvJPEG decodes a list far faster than one image at a time). It returns nothing when any
    image fails, so then each image is tried alone and only the ones that fail again are None.
    """
    # bytearray: torch.frombuffer wants a writable buffer; this copies the compressed bytes only (~1 MB at most)
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception as batch_error:  # torchvision raises RuntimeError; stay wide, the fallback is always safe
        log.info("batched JPEG decode of %d images failed (%s); retrying one by one", len(data), batch_error)
    decoded: list[torch.Tensor | None] = []
    for one in encoded:
        try:
            decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except Exception:
            decoded.append(None)
    return decoded


class GpuDecoder:
    """Turns a batch's Pixels into tensors on the inference thread: deferred JPEGs decoded on `device` together,
    the device decoder's refusals on the CPU path, and an undecodable image into its own ServiceError."""

    def __init__(
        self, device: torch.device, pre: Preprocessing, max_pixels: int, metrics: Metrics | None = None
    ) -> None:
        self.device = device
        self.pre = pre
        self.max_pixels = max_pixels  # the CPU fallback re-runs prepare(), which checks it again
        self.metrics = metrics

    @torch.inference_mode()
    def materialize(self, pixels: Sequence[Pixels]) -> list[torch.Tensor | ServiceError]:
        """Each image of a batch as a (3, S, S) uint8 tensor (on the device or the host; the predictor stacks
        them onto the device), or the ServiceError that answers its own request. Tensors pass through untouched."""
        jobs = {i: p for i, p in enumerate(pixels) if isinstance(p, DeferredJpeg)}
        decoded = decode_jpegs([job.data for job in jobs.values()], self.device) if jobs else []
        finished = {i: self._finish(job, image) for (i, job), image in zip(jobs.items(), decoded, strict=True)}
        return [finished[i] if i in finished else cast(torch.Tensor, p) for i, p in enumerate(pixels)]

    def _finish(self, job: DeferredJpeg, image: torch.Tensor | None) -> torch.Tensor | ServiceError:
        """One decoded JPEG -> its crop; a refused one (or one whose size disagrees with its header) -> the CPU
        path, whose answer, exact pixels or the proper 400, is the reference."""
        if image is not None:
            upright = orient(image, job.orientation)
            width, height = upright.shape[-1], upright.shape[-2]
            if (width, height) == job.size:
                self._count("device")
                return crop_resize(upright, self.pre)
            log.warning("device decoded %dx%d, header said %dx%d: using the CPU path", width, height, *job.size)
        self._count("cpu_fallback")
        try:
            tensor = prepare(job.data, self.pre, self.max_pixels).tensor
        except ImageRejected as err:
            return rejected_image(err)
        assert tensor is not None  # prepare without defer always decodes
        return tensor

    def _count(self, path: str) -> None:
        if self.metrics is not None and self.metrics.gpu_decode is not None:
            self.metrics.gpu_decode.labels(path).inc()

    def probe(self) -> bool:
        """Decode two small JPEGs and resize them on the device: True when the device decoder took both. Also the
        path's warm-up: nvJPEG creates its handles and buffers on first use (100s of ms), interpolate its kernels."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, "JPEG")
        decoded = decode_jpegs([buffer.getvalue()] * 2, self.device)
        if any(image is None or image.device.type != self.device.type for image in decoded):
            return False
        crop_resize(cast(torch.Tensor, decoded[0]), self.pre)
        return True


def gpu_decoder_for(
    mode: str, device: torch.device, pre: Preprocessing, max_pixels: int, metrics: Metrics | None = None
) -> GpuDecoder | None:
    """PETVIT_GPU_DECODE -> the decoder the service uses, or None for the CPU path.

    auto: on when the model is on CUDA and torchvision's nvJPEG decoder works there (probed once, at load).
    on: always, on the model's device (on a CPU that is torchvision's CPU decoder: for tests, no faster); on CUDA a
    decoder that does not work is an error, since the operator asked for it explicitly. off: never.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    decoder = GpuDecoder(device, pre, max_pixels, metrics)
    if decoder.probe():
        log.info("JPEG uploads decode on %s (PETVIT_GPU_DECODE=%s)", device, mode)
        return decoder
    if mode == "on":  # a load error, not an HTTP answer: /readyz shows it, as for a missing device
        raise ValueError(f"PETVIT_GPU_DECODE=on but torchvision cannot decode JPEGs on {device}")
    log.warning("torchvision cannot decode JPEGs on %s; JPEG uploads decode on the CPU", device)
    return None
