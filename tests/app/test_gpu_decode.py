"""The GPU input path (app/gpu_decode.py) without a GPU: the same code with device=cpu runs torchvision's CPU JPEG
decoder, so batching the deferred decodes, the CPU fallback, per-image failure isolation and the crop geometry are all
tested here. The tests marked for CUDA run only where one exists."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import app.gpu_decode as gpu_decode
from app.errors import ServiceError, rejected_image
from app.gpu_decode import GpuDecoder, crop_resize, decode_jpegs, gpu_decoder_for, orient
from app.metrics import Metrics
from model.artifact import load_artifact
from model.inference import stack_to_device
from model.preprocess import DeferredJpeg, ImageRejected, Preprocessing, crop_box, prepare

from .fixtures import encode, make_settings, metric_value, recording_loader, running_app

CPU = torch.device("cpu")
PRE = Preprocessing(224, 256)


def answered(rejected: ImageRejected) -> tuple[int, str]:
    """(HTTP status, code) the service answers a rejected upload with."""
    error = rejected_image(rejected)
    return error.status, error.code


# The deferred path against the CPU path (model/preprocess.prepare), in uint8 levels. The CPU path decodes big JPEGs at
# a reduced DCT scale (draft mode) and the device decoder cannot, so the two low-pass filters differ: up to ~2.5 levels
# on average and isolated edge pixels far more. Against PIL on the *fully* decoded image, same box, the only
# difference is rounding (PIL rounds to uint8 after each of its two passes, we once): at most 1 level.
MEAN_VS_CPU_PATH = 3.0
P99_VS_CPU_PATH = 16
MAX_VS_FULL_DECODE = 1


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().int() - b.cpu().int()).abs().float()


def full_decode_reference(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """The CPU path without the JPEG draft: PIL's resize of the same fractional box on the fully decoded image."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    crop = image.resize((pre.image_size, pre.image_size), Image.Resampling.BILINEAR, box=crop_box(*image.size, pre))
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)


def with_exif(image: Image.Image, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=90, **params)


def corrupt_jpeg(image: Image.Image) -> bytes:
    """A JPEG whose header is fine (it passes open_checked and is deferred) but whose scan data is garbage: both
    torchvision's decoder and PIL refuse it."""
    data = bytearray(encode(image, "JPEG", quality=90))
    for i in range(data.rfind(b"\xff\xda") + 40, len(data) - 2):  # keep the header, the scan header and the EOI
        data[i] ^= 0x5A
    return bytes(data)


def deferred_of(data: bytes, pre: Preprocessing = PRE) -> DeferredJpeg:
    pixels = prepare(data, pre, 10**9, defer=True).pixels
    assert isinstance(pixels, DeferredJpeg), "this JPEG should have been left to the device decoder"
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_an_image_as_pil_exif_transpose_does(orientation):
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(stored))
    tensor = torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    assert orient(tensor, orientation).permute(1, 2, 0).numpy().tolist() == expected.tolist()  # back to (H, W, 3)


@pytest.mark.parametrize(
    "label, build",
    [
        ("chelsea 451x300", lambda c: encode(c, "JPEG", quality=90)),
        ("chelsea 300x451 portrait", lambda c: encode(c.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90)),
        ("chelsea 1128x750", lambda c: encode(c.resize((1128, 750)), "JPEG", quality=90)),
        ("chelsea 750x1128 portrait", lambda c: encode(c.resize((750, 1128)), "JPEG", quality=90)),
        ("chelsea 2706x1800, drafted at 1/4", lambda c: encode(c.resize((2706, 1800)), "JPEG", quality=90)),
        ("chelsea 1804x1200 EXIF 6", lambda c: with_exif(c.resize((1804, 1200)), 6)),
        ("chelsea 451x300 EXIF 3", lambda c: with_exif(c, 3)),
        ("chelsea 451x300 EXIF 7", lambda c: with_exif(c, 7)),
        ("chelsea greyscale", lambda c: encode(c.convert("L"), "JPEG", quality=90)),
        ("chelsea progressive 4:4:4", lambda c: encode(c, "JPEG", quality=90, progressive=True, subsampling=0)),
        ("chelsea MPO, first of two frames", lambda c: encode(c, "MPO", save_all=True, append_images=[c.rotate(90)])),
    ],
)
def test_deferred_decode_matches_the_cpu_path_on_real_photos(chelsea, label, build):
    data = build(chelsea)
    decoder = GpuDecoder(CPU, PRE, 10**9)
    [tensor] = decoder.materialize([deferred_of(data)])
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8
    versus_cpu = levels(tensor, prepare(data, PRE, 10**9).tensor)
    assert versus_cpu.mean() <= MEAN_VS_CPU_PATH and versus_cpu.flatten().quantile(0.99) <= P99_VS_CPU_PATH, label
    assert levels(tensor, full_decode_reference(data, PRE)).max() <= MAX_VS_FULL_DECODE, label


def test_without_a_draft_the_deferred_path_is_within_one_level_of_the_cpu_path(chelsea):
    """At 451x300 the CPU path decodes at full size too: the two paths then differ by rounding alone."""
    data = encode(chelsea, "JPEG", quality=90)
    [tensor] = GpuDecoder(CPU, PRE, 10**9).materialize([deferred_of(data)])
    difference = levels(tensor, prepare(data, PRE, 10**9).tensor)
    assert difference.max() <= 1 and difference.mean() < 0.25


def test_cmyk_and_truncated_jpegs_stay_on_the_cpu_path(chelsea):
    """nvJPEG's take on Adobe CMYK and on a cut-short stream could not be checked without a GPU: PIL decides."""
    cmyk = encode(chelsea.convert("CMYK"), "JPEG", quality=90)
    good = encode(chelsea, "JPEG", quality=90)
    prepared = prepare(cmyk, PRE, 10**9, defer=True)
    assert prepared.deferred is None and torch.equal(prepared.tensor, prepare(cmyk, PRE, 10**9).tensor)
    with pytest.raises(ImageRejected) as info:
        prepare(good[: len(good) // 2], PRE, 10**9, defer=True)  # not deferred: PIL finds it truncated, here
    assert answered(info.value) == (400, "undecodable_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_the_cpu_fallback_gives_exactly_the_cpu_paths_tensor(chelsea, fmt, monkeypatch):
    """PNG and WebP are never deferred; a JPEG the device decoder refuses is decoded by prepare() itself."""
    data = encode(chelsea.resize((640, 427)), fmt, quality=90)
    expected = prepare(data, PRE, 10**9).tensor

    def refuse(*args, **kwargs):
        raise RuntimeError("the device decoder refuses this one")

    monkeypatch.setattr(gpu_decode, "decode_jpeg", refuse)
    metrics = Metrics()
    metrics.enable_gpu_decode_counter()
    pixels = prepare(data, PRE, 10**9, defer=True).pixels
    assert isinstance(pixels, DeferredJpeg) == (fmt == "JPEG")
    [tensor] = GpuDecoder(CPU, PRE, 10**9, metrics).materialize([pixels])
    assert torch.equal(tensor, expected)
    fallbacks = metrics.registry.get_sample_value("petvit_gpu_decode_images_total", {"path": "cpu_fallback"})
    assert fallbacks == (1 if fmt == "JPEG" else 0)


def test_a_failed_batched_decode_is_retried_image_by_image(chelsea, monkeypatch):
    good, bad = encode(chelsea, "JPEG", quality=90), corrupt_jpeg(chelsea)
    calls = []
    real = gpu_decode.decode_jpeg

    def spy(encoded, **kwargs):
        calls.append(len(encoded) if isinstance(encoded, list) else 1)
        return real(encoded, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", spy)
    first, refused, last = decode_jpegs([good, bad, good], CPU)
    assert calls == [3, 1, 1, 1]  # one batched call, then one per image
    assert refused is None and first.shape == last.shape == (3, 300, 451) and torch.equal(first, last)
    calls.clear()
    assert len(decode_jpegs([good, good], CPU)) == 2 and calls == [2]  # a clean batch: one call


def test_a_corrupt_jpeg_in_a_batch_is_its_own_400_and_the_rest_decode(chelsea):
    metrics = Metrics()
    metrics.enable_gpu_decode_counter()
    plain = torch.zeros(3, 224, 224, dtype=torch.uint8)
    good = deferred_of(encode(chelsea, "JPEG", quality=90))
    outcomes = GpuDecoder(CPU, PRE, 10**9, metrics).materialize([good, deferred_of(corrupt_jpeg(chelsea)), plain])
    assert isinstance(outcomes[0], torch.Tensor) and outcomes[2] is plain  # tensors pass through untouched
    refused = outcomes[1]
    assert isinstance(refused, ServiceError) and (refused.status, refused.code) == (400, "undecodable_image")
    counted = metrics.registry.get_sample_value
    assert counted("petvit_gpu_decode_images_total", {"path": "device"}) == 1
    assert counted("petvit_gpu_decode_images_total", {"path": "cpu_fallback"}) == 1


def test_extreme_aspect_ratios_resample_only_the_box():
    """A 60000x2 strip resized whole would be 7.7M x 256: only its crop box is resampled."""
    strip = torch.full((3, 2, 60000), 90, dtype=torch.uint8)
    strip[1] = 180
    crop = crop_resize(strip, PRE)
    assert crop.shape == (3, 224, 224) and crop[:, 100, 100].tolist() == [90, 180, 90]


def test_header_checks_refuse_before_any_decode(chelsea, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    big = encode(chelsea.resize((1200, 800)), "JPEG", quality=90)
    monkeypatch.setattr(gpu_decode, "decode_jpeg", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)  # what decodes an opened file's pixels
    with pytest.raises(ImageRejected) as info:
        prepare(big, PRE, max_pixels=1199 * 800, defer=True)
    assert answered(info.value) == (413, "image_too_large")
    with pytest.raises(ImageRejected) as info:
        prepare(b"\x00\x00\x00\x18ftypheic" + bytes(64), PRE, 10**9, defer=True)
    assert answered(info.value) == (415, "unsupported_media_type")
    assert deferred_of(big).size == (1200, 800)  # under the limit: deferred, still nothing decoded


def test_the_setting_picks_the_decoder(monkeypatch):
    assert gpu_decoder_for("off", CPU, PRE, 10**9) is None
    assert gpu_decoder_for("auto", CPU, PRE, 10**9) is None  # the CPU pool is the fast path on a CPU
    decoder = gpu_decoder_for("on", CPU, PRE, 10**9)
    assert decoder is not None and decoder.device == CPU

    def no_gpu_decoder(*args, **kwargs):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(gpu_decode, "decode_jpeg", no_gpu_decoder)
    assert gpu_decoder_for("auto", torch.device("cuda"), PRE, 10**9) is None  # falls back to the CPU pool
    with pytest.raises(ValueError, match="PETVIT_GPU_DECODE=on"):
        gpu_decoder_for("on", torch.device("cuda"), PRE, 10**9)


async def test_the_default_on_a_cpu_keeps_the_cpu_path(tiny_artifact):
    async with running_app(make_settings(tiny_artifact)) as (client, service):
        assert service.models.ready and service.settings.gpu_decode == "auto" and service.models.gpu_decoder is None
        metrics = (await client.get("/metrics")).text
    assert "petvit_gpu_decode_images_total" not in metrics


def expected_probs(artifact, data: bytes) -> torch.Tensor:
    """What the model says about these bytes decoded through the deferred path."""
    model, meta = load_artifact(artifact, "cpu")
    [tensor] = GpuDecoder(CPU, meta.preprocessing, 10**9).materialize([deferred_of(data, meta.preprocessing)])
    with torch.inference_mode():
        return model(tensor[None]).float().softmax(-1)[0]  # (1, 3, S, S) -> (classes,)


async def test_a_corrupt_jpeg_fails_its_own_request_only(tiny_artifact, chelsea):
    """Five concurrent requests share one batch; the corrupt JPEG's decode fails on the inference thread. Its request
    gets 400 undecodable_image naming the image; the other four get 200 with their own predictions."""
    settings = make_settings(tiny_artifact, gpu_decode="on", max_batch_size=8, max_wait_ms=300)
    photos = [chelsea.resize((451 + 40 * i, 300 + 10 * i)).rotate(7 * i) for i in range(4)]
    uploads = [encode(p, "JPEG", quality=90) for p in photos]
    uploads.insert(2, corrupt_jpeg(chelsea))
    async with running_app(settings, recording_loader(tiny_artifact)) as (client, service):
        assert service.models.gpu_decoder is not None
        responses = await asyncio.wait_for(
            asyncio.gather(
                *(
                    client.post("/classify?top_k=5", files={"file": (f"{i}.jpg", data, "image/jpeg")})
                    for i, data in enumerate(uploads)
                )
            ),
            30,
        )
        batch_count = metric_value(service, "petvit_batch_size_count")
        batch_sum = metric_value(service, "petvit_batch_size_sum")
        fallbacks = metric_value(service, "petvit_gpu_decode_images_total", path="cpu_fallback")
        on_device = metric_value(service, "petvit_gpu_decode_images_total", path="device")
        recorded = [len(batch) for batch in service.models.predictor.batches]
        bad_images = metric_value(service, "petvit_rejected_total", reason="bad_image")
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200]
    error = responses[2].json()["error"]
    assert error["code"] == "undecodable_image" and error["message"].startswith("image 1 (2.jpg): ")
    assert (batch_count, batch_sum, recorded) == (1, 5, [4])  # one batch of five; the model saw the four good ones
    assert (on_device, fallbacks, bad_images) == (4, 1, 1)
    for response, data in [(r, u) for i, (r, u) in enumerate(zip(responses, uploads, strict=True)) if i != 2]:
        [result] = response.json()["results"]
        expected = expected_probs(tiny_artifact, data)
        scores, indices = torch.topk(expected, 5)
        assert [p["index"] for p in result["predictions"]] == indices.tolist()
        np.testing.assert_allclose([p["score"] for p in result["predictions"]], scores.numpy(), rtol=1e-5, atol=1e-6)


async def test_header_checks_still_answer_413_and_415_on_the_deferred_path(tiny_artifact, chelsea, monkeypatch):
    settings = make_settings(tiny_artifact, gpu_decode="on", max_pixels=500 * 400, max_upload_bytes=200_000)
    async with running_app(settings) as (client, service):
        assert service.models.gpu_decoder is not None
        decodes = []
        real = gpu_decode.decode_jpeg
        monkeypatch.setattr(gpu_decode, "decode_jpeg", lambda *a, **k: decodes.append(1) or real(*a, **k))

        async def post(data: bytes):
            return await client.post("/classify", content=data, headers={"Content-Type": "image/jpeg"})

        too_many_pixels = await post(encode(chelsea.resize((600, 400)), "JPEG", quality=50))
        too_many_bytes = await post(encode(Image.effect_noise((450, 400), 120).convert("RGB"), "JPEG", quality=100))
        heic = await post(b"\x00\x00\x00\x18ftypheic" + bytes(64))
        assert decodes == []  # none of them reached the device decoder
        rotated = await post(with_exif(chelsea, 6))
    assert (too_many_pixels.status_code, too_many_pixels.json()["error"]["code"]) == (413, "image_too_large")
    assert (too_many_bytes.status_code, too_many_bytes.json()["error"]["code"]) == (413, "upload_too_large")
    assert (heic.status_code, heic.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert rotated.status_code == 200 and decodes == [1]
    assert (rotated.json()["results"][0]["width"], rotated.json()["results"][0]["height"]) == (300, 451)


def test_stack_to_device_on_the_cpu_is_the_plain_stack():
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    assert torch.equal(stack_to_device(images, CPU), torch.stack(images))


@pytest.mark.gpu
def test_stack_to_device_mixes_host_and_device_images_on_cuda():
    cuda = torch.device("cuda")
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(4)]
    mixed = [image.to(cuda) if i % 2 else image for i, image in enumerate(images)]
    batch = stack_to_device(mixed, cuda)
    assert batch.device.type == "cuda" and torch.equal(batch.cpu(), torch.stack(images))
    assert torch.equal(stack_to_device(images, cuda).cpu(), torch.stack(images))  # all on the host: pinned


@pytest.mark.gpu
def test_nvjpeg_matches_the_cpu_path_within_tolerance(chelsea):
    """Not run on the CPU box this was written on: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's."""
    decoder = gpu_decoder_for("on", torch.device("cuda"), PRE, 10**9)
    assert decoder is not None
    datas = [encode(chelsea.resize(size), "JPEG", quality=90) for size in ((451, 300), (300, 451), (2706, 1800))]
    datas.append(with_exif(chelsea.resize((1804, 1200)), 6))
    datas.append(encode(chelsea.convert("L"), "JPEG", quality=90))
    tensors = decoder.materialize([deferred_of(data) for data in datas])
    for data, tensor in zip(datas, tensors, strict=True):
        assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda"
        difference = levels(tensor, prepare(data, PRE, 10**9).tensor)
        assert difference.mean() <= MEAN_VS_CPU_PATH and difference.flatten().quantile(0.99) <= P99_VS_CPU_PATH
