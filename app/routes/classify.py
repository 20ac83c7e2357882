"""POST /classify: read the uploads, prepare them (thread pool), run them through the DynamicBatcher, answer.

Each step raises the ServiceError that answers its own failure; the route counts a refused request once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Annotated, cast

import torch
from fastapi import APIRouter, Query, Request, Response

from app.admission import refusal
from app.batch_errors import BatcherError
from app.batcher import Admission, BatchResult
from app.deps import ApiKeyDep, ServiceDep
from app.errors import (
    ServiceError,
    client_disconnected,
    in_image,
    invalid_parameters,
    rejected_image,
)
from app.lifecycle import ImageBatcher, ImageJob, ImageOutcome, ModelGeneration, ServiceLifecycle
from app.schemas import (
    DEFAULT_HEATMAP_METHOD,
    ERROR_RESPONSES,
    ClassifyResponse,
    Heatmap,
    HeatmapMethodName,
    ImageResult,
    Prediction,
    Timings,
)
from app.uploads import FILE_FIELD, Upload, check_headers, read_uploads
from model.inference import Classifier, ImagePrediction
from model.overlay import overlay_png_base64
from model.preprocess import ImageRejected, PreparedImage, Preprocessing, prepare

router = APIRouter(tags=["classify"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": f"multipart/form-data with one or more `{FILE_FIELD}` fields, or a single image as the raw body",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    # At least one image: an empty form is refused (422 no_images), so the schema says so too,
                    # and generated clients and fuzzers agree with the service.
                    "properties": {
                        FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": [FILE_FIELD],
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass(frozen=True)
class _Image:
    """One upload, prepared: what the answer reports about it besides the model's output."""

    upload: Upload
    prepared: PreparedImage
    preprocess_s: float


@dataclass(frozen=True)
class _Overlay:
    png: str | None  # None with heatmap_png=false: the client draws the grid itself
    seconds: float


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="classify one or more pet photos",
    description=(
        "Send images as multipart fields named `file` (repeat the field for several, up to PETVIT_MAX_FILES) or one "
        "image as the raw body with an `image/*` Content-Type. Each image gets its top-k breeds, sorted by score; "
        "`heatmap=true` adds the heatmap grid and a transparent PNG overlay at the image's own size (heat "
        "over the crop the model saw, a dark veil outside it) for the client to lay over the photo; `heatmap_method` "
        "chooses the heatmap."
    ),
    responses=ERROR_RESPONSES,
    dependencies=[ApiKeyDep],
    openapi_extra=_BODY_DOC,
)
async def classify(
    request: Request,
    response: Response,
    service: ServiceDep,
    top_k: Annotated[int | None, Query(ge=1, description="how many breeds per image (1..number of labels)")] = None,
    heatmap: Annotated[bool, Query(description="add an attention-rollout heatmap per image")] = False,
    heatmap_png: Annotated[
        bool,
        Query(
            description="with heatmap=true, also render the PNG overlay (false: the grid only, for clients that "
            "draw it themselves)"
        ),
    ] = True,
    heatmap_method: Annotated[
        HeatmapMethodName,
        Query(
            description="with heatmap=true, which heatmap: `rollout` (default: attention rollout, heads averaged, the "
            "weakest 90% of each token's links dropped per block; the best measured) or `gradient` (gradient "
            "rollout, specific to the top breed; adds a backward pass, about 2-3x the heatmap's inference time)"
        ),
    ] = DEFAULT_HEATMAP_METHOD,
) -> ClassifyResponse:
    arrived = time.monotonic()
    settings = service.settings
    deadline = arrived + settings.request_timeout_s
    try:
        # Pinned to the model live now (a reload meanwhile does not change who answers), with queue room held for
        # the request's images from before its body is read: refusals come before reading and decoding, not after.
        with service.serving() as generation, generation.batcher.admit(deadline) as admission:
            predictor = generation.predictor
            k = _top_k(top_k, settings.default_top_k, len(predictor.labels))
            _check_heatmap_method(heatmap and heatmap_method == HeatmapMethodName.gradient, predictor)
            check_headers(request, settings.max_upload_bytes, settings.max_files)  # 415/400/413: never a 429
            _admit(admission, 1, settings.request_timeout_s)  # the least any request brings; a raw body is one
            admit = functools.partial(_admit, admission, timeout_s=settings.request_timeout_s)
            uploads = await read_uploads(request, settings.max_upload_bytes, settings.max_files, on_image=admit)
            images = await _prepare(service, generation, uploads)
            jobs = [ImageJob(image.prepared.pixels, heatmap, heatmap_method.value) for image in images]
            ran = await _run(request, generation.batcher, jobs, admission, settings.request_timeout_s)
            results = _decoded(images, ran)
            overlays = await _overlays(service, images, results, heatmap, heatmap_png)
            threshold = predictor.unknown_threshold(settings.unknown_threshold)
            answers = [
                _answer(predictor, k, image, result, overlay, heatmap_method.value, threshold)
                for image, result, overlay in zip(images, results, overlays, strict=True)
            ]
            service.metrics.images.inc(len(answers))
            service.metrics.unknown.inc(sum(answer.unknown is True for answer in answers))
            response.headers["X-Model-SHA256"] = predictor.sha256
            return ClassifyResponse(
                model=predictor.metadata.name,
                model_sha256=predictor.sha256,
                results=answers,
                timings={"total_ms": _ms(time.monotonic() - arrived)},
            )
    except ServiceError as err:
        service.metrics.count_rejection(err)
        raise


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


async def _prepare(service: ServiceLifecycle, generation: ModelGeneration, uploads: list[Upload]) -> list[_Image]:
    """Decode, check and crop every upload in the preprocess pool, as the request's model wants them. The first bad
    one in upload order fails the request, its message saying which image it was."""
    loop = asyncio.get_running_loop()
    pool, max_pixels = service.preprocess_pool, service.settings.max_pixels
    pre: Preprocessing = generation.predictor.preprocessing
    defer = generation.gpu_decoder is not None  # JPEGs: header checks here, pixels on the model's device
    outcomes = await asyncio.gather(
        *(loop.run_in_executor(pool, _timed_prepare, u.data, pre, max_pixels, defer) for u in uploads),
        return_exceptions=True,
    )
    for number, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True), start=1):
        if isinstance(outcome, ImageRejected):
            raise in_image(rejected_image(outcome), number, upload.filename)
        if isinstance(outcome, BaseException):
            raise outcome
    images = [_Image(upload, *outcome) for upload, outcome in zip(uploads, outcomes, strict=True)]
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


def _decoded(images: list[_Image], results: list[BatchResult[ImageOutcome]]) -> list[BatchResult[ImagePrediction]]:
    """The results, once every image has a prediction. A JPEG left to the model's device that neither it nor the CPU
    could decode comes back as its ServiceError (400): the first such image in upload order fails this request, as
    in _prepare; the other requests of its batch were answered."""
    for number, (image, result) in enumerate(zip(images, results, strict=True), start=1):
        if isinstance(result.value, ServiceError):
            raise in_image(result.value, number, image.upload.filename)
    return cast(list[BatchResult[ImagePrediction]], results)


async def _overlays(
    service: ServiceLifecycle,
    images: list[_Image],
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
            loop.run_in_executor(service.preprocess_pool, _timed_overlay, image.prepared, result.value.grid)
            for image, result in zip(images, results, strict=True)
        )
    )


def _timed_overlay(prepared: PreparedImage, grid: torch.Tensor) -> _Overlay:
    # The overlay needs only the upload's size and the crop box, not its pixels: the client composes it.
    start = time.perf_counter()
    png = overlay_png_base64(grid, prepared.size, prepared.crop_box)
    return _Overlay(png, time.perf_counter() - start)


def _answer(
    predictor: Classifier,
    k: int,
    image: _Image,
    result: BatchResult[ImagePrediction],
    overlay: _Overlay | None,
    method: str,
    threshold: float | None,
) -> ImageResult:
    grid, score = result.value.grid, result.value.ood_score
    width, height = image.prepared.size
    return ImageResult(
        filename=image.upload.filename,
        width=width,
        height=height,
        predictions=[Prediction(**p) for p in predictor.top_k(result.value.probs, k)],
        # Above the threshold: none of the classes. No threshold (or no score): the service cannot say.
        unknown=None if threshold is None or score is None else score > threshold,
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
