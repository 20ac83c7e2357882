"""How far the GPU input path's pixels are from the CPU path's, on real photos.

    .venv/bin/python bench/gpu_decode_diff.py                   # device cpu: the same code with torchvision's decoder
    .venv/bin/python bench/gpu_decode_diff.py --device cuda     # nvJPEG (needs a GPU)

For each photo (scikit-image's chelsea, coffee, rocket, astronaut, retina and camera) at several sizes, portrait and
landscape, EXIF-rotated, greyscale, progressive, it runs model/preprocess.prepare (the CPU path: draft decode, PIL
resize of the fractional crop box) and the deferred path (app/gpu_decode: full decode, the box in whole pixels,
antialiased interpolate) and prints the max / mean / 99th-percentile absolute difference in uint8 levels. A third
column set isolates the filter and the box rounding from the JPEG draft: PIL on the fully decoded image, same box.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.gpu_decode import GpuDecoder
from model.preprocess import Preprocessing, crop_box, prepare

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 deprecates its decoders


def photos() -> dict[str, Image.Image]:
    from skimage import data

    rgb = {name: Image.fromarray(getattr(data, name)()) for name in ("chelsea", "coffee", "rocket", "astronaut")}
    rgb["retina"] = Image.fromarray(data.retina())
    rgb["camera (grey)"] = Image.fromarray(data.camera())
    return rgb


def cases() -> list[tuple[str, bytes]]:
    """(label, JPEG bytes): every photo at its own size and scaled up to phone-photo sizes, both orientations."""
    out = []
    for name, photo in photos().items():
        w, h = photo.size
        for scale in (1.0, 2.5, 6.0):
            size = (round(w * scale), round(h * scale))
            image = photo.resize(size, Image.Resampling.LANCZOS) if scale != 1.0 else photo
            out.append((f"{name} {size[0]}x{size[1]}", encode(image)))
            if scale == 2.5:
                portrait = image.transpose(Image.Transpose.ROTATE_90)
                out.append((f"{name} {portrait.size[0]}x{portrait.size[1]} portrait", encode(portrait)))
    chelsea = photos()["chelsea"].resize((1804, 1200), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    for orientation in (3, 6, 8):
        exif[0x0112] = orientation
        out.append((f"chelsea 1804x1200 EXIF {orientation}", encode(chelsea, exif=exif.tobytes())))
    out.append(("chelsea 1804x1200 progressive", encode(chelsea, progressive=True)))
    out.append(("chelsea 1804x1200 4:4:4", encode(chelsea, subsampling=0)))
    return out


def encode(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def full_decode_reference(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """The CPU path without the JPEG draft: PIL's resize of the fractional box on the fully decoded image."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    box = crop_box(*image.size, pre)
    crop = image.resize((pre.image_size, pre.image_size), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)


def stats(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float, float]:
    diff = (a.int() - b.int()).abs().float()
    return int(diff.max()), float(diff.mean()), float(diff.flatten().quantile(0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-size", type=int, default=256)
    args = parser.parse_args()
    pre = Preprocessing(args.image_size, args.resize_size)
    decoder = GpuDecoder(torch.device(args.device), pre, 10**9)
    labelled = cases()
    deferred = [prepare(data, pre, 10**9, defer=True).pixels for _, data in labelled]
    gpu = decoder.materialize(deferred)
    print(f"device {args.device}, crop {pre.image_size} from shorter side {pre.resize_size}; |difference| in levels")
    print(f"{'photo':40} {'vs CPU path: max':>16} {'mean':>6} {'p99':>4}   {'vs full decode: max':>19} {'mean':>6}")
    worst, means = 0, []
    for (label, data), image in zip(labelled, gpu, strict=True):
        assert isinstance(image, torch.Tensor), f"{label}: {image}"
        high, mean, p99 = stats(image.cpu(), prepare(data, pre, 10**9).tensor)
        full_high, full_mean, _ = stats(image.cpu(), full_decode_reference(data, pre))
        worst, means = max(worst, high), [*means, mean]
        print(f"{label:40} {high:>16} {mean:>6.2f} {p99:>4.0f}   {full_high:>19} {full_mean:>6.2f}")
    print(f"all {len(labelled)}: max {worst}, mean of means {np.mean(means):.2f}")


if __name__ == "__main__":
    main()
