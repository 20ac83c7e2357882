"""POST /classify's work in LitServe's shape: decode -> predict -> encode, three named steps the route calls in turn.

- decode: the request's parameters, headers and body (streamed, its images admitted one by one as they arrive),
  each upload checked and cropped in the preprocess pool, or a JPEG's pixels left for the model's device
  (app/gpu_decode.py);
- predict: the images through the request's model generation: its batcher queues them, and its inference thread
  runs predict_batch on each batch (deferred JPEGs decoded on the device, then one Classifier.predict);
- encode: top-k, `unknown`, the heatmap overlays (rendered in the preprocess pool), the response schema.

Each step raises the ServiceError that answers its own failure; the route counts a refused request once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from starlette.requests import Request

from app.batch_errors import BatcherError
from app.batcher import Admission, BatchResult, DynamicBatcher
from app.errors import ServiceError, client_disconnected, in_image, invalid_parameters, refusal, rejected_image
from app.gpu_decode import GpuDecoder, Pixels
from app.schemas import ClassifyResponse, Heatmap, ImageResult, Prediction, Timings
from app.uploads import Upload, check_headers, read_uploads
from model.artifact import Preprocessing
from model.explain import DEFAULT_METHOD
from model.inference import Classifier, ImagePrediction
from model.overlay import overlay_png_base64
from model.preprocess import ImageRejected, PreparedImage, prepare

if TYPE_CHECKING:  # the lifecycle runs predict_batch: it imports this module
    from app.lifecycle import ModelGeneration
    from app.service import Service


@dataclass(frozen=True)
class ImageJob:
    """One image for the model: what the service's batcher queues and its inference thread hands the classifier."""

    pixels: Pixels  # (3, S, S) uint8 as model.preprocess.prepare makes it, or a JPEG left for the model's device
    heatmap: bool  # run it on the explicit-attention path and return its heatmap grid
    heatmap_method: str = DEFAULT_METHOD  # which heatmap: a key of model.explain.SERVICE_METHODS


# One image's result from its batch: the prediction, or the ServiceError (a 400 for a JPEG that turned out corrupt
# when the inference thread decoded it) that answers its own request. An error travels as a result, not as an
# exception, because the batcher fails every item of a batch on an exception: the other requests sharing the forward
# pass must still get their answers.
ImageOutcome = ImagePrediction | ServiceError
ImageBatcher = DynamicBatcher[ImageJob, ImageOutcome]


@dataclass(frozen=True)
class ClassifyOptions:
    """What the client asked for besides its images (the query parameters)."""

    top_k: int | None
    heatmap: bool = False
    heatmap_png: bool = True  # with heatmap: also render the PNG overlay (False: the grid only)
    heatmap_method: str = DEFAULT_METHOD


@dataclass(frozen=True)
class DecodedImage:
    """One upload, prepared: what the answer reports about it besides the model's output."""

    upload: Upload
    prepared: PreparedImage
    preprocess_s: float


@dataclass(frozen=True)
class Decoded:
    """decode's result: how many breeds per image, and the images in upload order."""

    k: int
    images: list[DecodedImage]


@dataclass(frozen=True)
class _Overlay:
    png: str | None  # None with heatmap_png=false: the client draws the grid itself
    seconds: float


# ---------------------------------------------------------------------------------------------------------- decode
async def decode(
    request: Request,
    service: Service,
    generation: ModelGeneration,
    options: ClassifyOptions,
    admission: Admission,
) -> Decoded:
    """The parameters checked (422), the headers (415/400/413: never a 429), then the body read with queue room held
    for each image as it starts (429 before more is read), and every upload prepared as the request's model wants."""
    settings, classifier = service.settings, generation.predictor
    k = _top_k(options.top_k, settings.default_top_k, len(classifier.labels))
    _check_heatmap_method(options.heatmap and options.heatmap_method == "gradient", classifier)
    check_headers(request, settings.max_upload_bytes, settings.max_files)
    _admit(admission, 1, settings.request_timeout_s)  # the least any request brings; a raw body is one
    admit = functools.partial(_admit, admission, timeout_s=settings.request_timeout_s)
    uploads = await read_uploads(request, settings.max_upload_bytes, settings.max_files, on_image=admit)
    return Decoded(k, await _prepare(service, generation, uploads))


def _top_k(requested: int | None, default: int, labels: int) -> int:
    """How many breeds per image. PETVIT_DEFAULT_TOP_K is a preference, not the client's request: a model with
    fewer labels caps it instead of answering 422."""
    if requested is None:
        return min(default, labels)
    if requested > labels:
        raise invalid_parameters(f"top_k must be between 1 and {labels}, got {requested}")
    return requested


def _check_heatmap_method(gradient: bool, predictor: Classifier) -> None:
    """Gradient rollout needs a backward pass; torchao's int8 layers have none, so say so before reading the body
    rather than fail the batch later."""
    if gradient and predictor.dtype_name == "int8":
        raise invalid_parameters(
            "heatmap_method=gradient needs gradients, which this int8 model does not have; "
            "use heatmap_method=rollout, or serve with PETVIT_DTYPE=float32 or bfloat16"
        )


async def _prepare(service: Service, generation: ModelGeneration, uploads: list[Upload]) -> list[DecodedImage]:
    """Decode, check and crop every upload in the preprocess pool, as the request's model wants them. The first bad
    one in upload order fails the request, its message saying which image it was."""
    loop = asyncio.get_running_loop()
    pool, max_pixels = service.pool, service.settings.max_pixels
    pre: Preprocessing = generation.predictor.preprocessing
    defer = generation.gpu_decoder is not None  # JPEGs: header checks here, pixels on the model's device
    outcomes = await asyncio.gather(
        *(loop.run_in_executor(pool, _timed_prepare, u.data, pre, max_pixels, defer) for u in uploads),
        return_exceptions=True,
    )
    images: list[DecodedImage] = []
    for number, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True), start=1):
        if isinstance(outcome, ImageRejected):
            raise in_image(rejected_image(outcome), number, upload.filename)
        if isinstance(outcome, BaseException):
            raise outcome
        images.append(DecodedImage(upload, *outcome))
    for image in images:
        service.metrics.preprocess_duration.observe(image.preprocess_s)
    return images


def _timed_prepare(data: bytes, pre: Preprocessing, max_pixels: int, defer: bool) -> tuple[PreparedImage, float]:
    start = time.perf_counter()
    return prepare(data, pre, max_pixels, defer=defer), time.perf_counter() - start


def _admit(admission: Admission, images: int, timeout_s: float) -> None:
    """Hold queue room for `images` of this request, or refuse it now (429) before more of it is read."""
    try:
        admission.need(images)
    except BatcherError as err:
        raise refusal(err, timeout_s) from None


# --------------------------------------------------------------------------------------------------------- predict
async def predict(
    request: Request,
    service: Service,
    generation: ModelGeneration,
    decoded: Decoded,
    options: ClassifyOptions,
    admission: Admission,
) -> list[BatchResult[ImagePrediction]]:
    """Every image's prediction, in order, from the request's generation by the admission's deadline."""
    jobs = [ImageJob(image.prepared.pixels, options.heatmap, options.heatmap_method) for image in decoded.images]
    ran = await _run(request, generation.batcher, jobs, admission, service.settings.request_timeout_s)
    return _decoded(decoded.images, ran)


def predict_batch(classifier: Classifier, decoder: GpuDecoder | None, jobs: list[ImageJob]) -> list[ImageOutcome]:
    """One batch of one generation, on its batcher's inference thread. Deferred JPEGs are decoded here, together,
    right before the forward pass; an image that cannot be decoded is its own outcome and the rest of the batch
    runs without it."""
    pixels = [job.pixels for job in jobs]  # DeferredJpegs only when a decoder is set: decode defers for it
    images = decoder.materialize(pixels) if decoder else [cast(torch.Tensor, p) for p in pixels]
    ready = [(im, job) for im, job in zip(images, jobs, strict=True) if isinstance(im, torch.Tensor)]
    heatmaps, methods = [job.heatmap for _, job in ready], [job.heatmap_method for _, job in ready]
    predictions = iter(classifier.predict([image for image, _ in ready], heatmaps, methods))
    return [next(predictions) if isinstance(image, torch.Tensor) else image for image in images]


async def _run(
    request: Request, batcher: ImageBatcher, jobs: list[ImageJob], admission: Admission, timeout_s: float
) -> list[BatchResult[ImageOutcome]]:
    """The model's output for every job, in order, by the admission's deadline, or the ServiceError that answers why
    there is none. A client that disconnects meanwhile has its images still queued dropped: nobody would read them."""
    running = asyncio.ensure_future(batcher.run(jobs, admission.deadline, admission))
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not running.done():
            running.cancel()  # run() marks its queued images cancelled; the batcher skips and counts them
            with contextlib.suppress(asyncio.CancelledError, BatcherError):
                await running
    if not running.done() or running.cancelled():
        raise client_disconnected()
    try:
        return running.result()
    except BatcherError as err:
        raise refusal(err, timeout_s) from None


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone. The body has been read, so the server's next message is the disconnect
    (uvicorn sends it when the client closes the connection, and once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _decoded(
    images: list[DecodedImage], results: list[BatchResult[ImageOutcome]]
) -> list[BatchResult[ImagePrediction]]:
    """The results, once every image has a prediction. A JPEG left to the model's device that neither it nor the CPU
    could decode comes back as its ServiceError (400): the first such image in upload order fails this request, as
    in _prepare; the other requests of its batch were answered."""
    for number, (image, result) in enumerate(zip(images, results, strict=True), start=1):
        if isinstance(result.value, ServiceError):
            raise in_image(result.value, number, image.upload.filename)
    return cast(list[BatchResult[ImagePrediction]], results)


# ---------------------------------------------------------------------------------------------------------- encode
async def encode(
    service: Service,
    classifier: Classifier,
    decoded: Decoded,
    results: list[BatchResult[ImagePrediction]],
    options: ClassifyOptions,
    arrived: float,
) -> ClassifyResponse:
    """The response: per image its top-k, `unknown`, heatmap (grid and overlay) and timings, in upload order."""
    images = decoded.images
    overlays = await _overlays(service, images, results, options.heatmap, options.heatmap_png)
    override = service.settings.unknown_threshold
    answers = [
        _answer(classifier, decoded.k, image, result, overlay, options.heatmap_method, override)
        for image, result, overlay in zip(images, results, overlays, strict=True)
    ]
    service.metrics.images.inc(len(answers))
    service.metrics.unknown.inc(sum(answer.unknown is True for answer in answers))
    return ClassifyResponse(
        model=classifier.metadata.name,
        model_sha256=classifier.sha256,
        results=answers,
        timings={"total_ms": _ms(time.monotonic() - arrived)},
    )


async def _overlays(
    service: Service,
    images: list[DecodedImage],
    results: list[BatchResult[ImagePrediction]],
    heatmap: bool,
    heatmap_png: bool,
) -> list[_Overlay | None]:
    """Per image: None without a heatmap, else its PNG overlay (rendered in the preprocess pool, off the event loop
    and the inference thread) and the time that took."""
    if not heatmap:
        return [None] * len(images)
    if not heatmap_png:
        return [_Overlay(None, 0.0)] * len(images)
    loop = asyncio.get_running_loop()
    return await asyncio.gather(
        *(
            loop.run_in_executor(service.pool, _timed_overlay, image.prepared, result.value.grid)
            for image, result in zip(images, results, strict=True)
        )
    )


def _timed_overlay(prepared: PreparedImage, grid: torch.Tensor | None) -> _Overlay:
    assert grid is not None  # a heatmap was asked for, so the inference face computed every image's grid
    # The overlay needs only the upload's size and the crop box, not its pixels: the client composes it.
    start = time.perf_counter()
    png = overlay_png_base64(grid, prepared.size, prepared.crop_box)
    return _Overlay(png, time.perf_counter() - start)


def _answer(
    predictor: Classifier,
    k: int,
    image: DecodedImage,
    result: BatchResult[ImagePrediction],
    overlay: _Overlay | None,
    method: str,
    override: float | None,
) -> ImageResult:
    grid, score = result.value.grid, result.value.ood_score
    width, height = image.prepared.size
    return ImageResult(
        filename=image.upload.filename,
        width=width,
        height=height,
        predictions=[Prediction(**p) for p in predictor.top_k(result.value.probs, k)],
        unknown=predictor.is_unknown(score, override),
        ood_score=score,
        heatmap=(
            Heatmap(grid=grid.tolist(), method=method, png=overlay.png, rows=grid.shape[0], cols=grid.shape[1])
            if overlay is not None and grid is not None
            else None
        ),
        timings=Timings(
            preprocess_ms=_ms(image.preprocess_s),
            queue_ms=_ms(result.queue_wait_s),
            inference_ms=_ms(result.inference_s),
            batch_size=result.batch_size,
            heatmap_ms=_ms(overlay.seconds) if overlay is not None else None,
        ),
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
