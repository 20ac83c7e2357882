"""POST /classify: read the uploads, prepare them (thread pool), run them through the DynamicBatcher, answer.

Each step raises the ServiceError that answers its own failure; the route counts a refused request once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, cast

import torch
from fastapi import APIRouter, Query, Request

from app.batcher import BatcherClosedError, BatchResult, DeadlineExceededError, InferenceFailedError, QueueFullError
from app.deps import ApiKeyDep, ServiceDep
from app.errors import (
    ServiceError,
    deadline_exceeded,
    in_image,
    inference_failed,
    invalid_parameters,
    queue_full,
    shutting_down,
)
from app.heatmap import overlay_png_base64
from app.lifecycle import ImageBatcher, ImageJob, ImageOutcome, ServiceLifecycle
from app.predictor import ImagePrediction, Predictor
from app.preprocess import PreparedImage, Preprocessing, prepare
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
from app.uploads import FILE_FIELD, Upload, read_uploads

router = APIRouter(tags=["classify"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": f"multipart/form-data with one or more `{FILE_FIELD}` fields, or a single image as the raw body",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
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
    try:
        with service.serving() as (predictor, batcher):
            k = _top_k(top_k, settings.default_top_k, len(predictor.labels))
            _check_heatmap_method(heatmap and heatmap_method == HeatmapMethodName.gradient, predictor)
            uploads = await read_uploads(request, settings.max_upload_bytes, settings.max_files)
            images = await _prepare(service, predictor.preprocessing, uploads)
            jobs = [ImageJob(image.prepared.pixels, heatmap, heatmap_method.value) for image in images]
            results = _decoded(images, await _run(batcher, jobs, arrived, settings.request_timeout_s))
            overlays = await _overlays(service, images, results, heatmap, heatmap_png)
            threshold = predictor.unknown_threshold(settings.unknown_threshold)
            answers = [
                _answer(predictor, k, image, result, overlay, heatmap_method.value, threshold)
                for image, result, overlay in zip(images, results, overlays, strict=True)
            ]
            service.metrics.images.inc(len(answers))
            service.metrics.unknown.inc(sum(answer.unknown is True for answer in answers))
            return ClassifyResponse(
                model=predictor.metadata.name,
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


def _check_heatmap_method(gradient: bool, predictor: Predictor) -> None:
    """Gradient rollout needs a backward pass; torchao's int8 layers have none, so say so before reading the body
    rather than fail the batch later."""
    if gradient and predictor.dtype_name == "int8":
        raise invalid_parameters(
            "heatmap_method=gradient needs gradients, which this int8 model does not have; "
            "use heatmap_method=rollout, or serve with PETVIT_DTYPE=float32 or bfloat16"
        )


async def _prepare(service: ServiceLifecycle, pre: Preprocessing, uploads: list[Upload]) -> list[_Image]:
    """Decode, check and crop every upload in the preprocess pool. The first bad one in upload order fails the
    request, its message saying which image it was."""
    loop = asyncio.get_running_loop()
    pool, max_pixels = service.preprocess_pool, service.settings.max_pixels
    defer = service.gpu_decoder is not None  # JPEGs: header checks here, pixels on the model's device
    outcomes = await asyncio.gather(
        *(loop.run_in_executor(pool, _timed_prepare, u.data, pre, max_pixels, defer) for u in uploads),
        return_exceptions=True,
    )
    for number, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True), start=1):
        if isinstance(outcome, ServiceError):
            raise in_image(outcome, number, upload.filename)
        if isinstance(outcome, BaseException):
            raise outcome
    images = [_Image(upload, *outcome) for upload, outcome in zip(uploads, outcomes, strict=True)]
    for image in images:
        service.metrics.preprocess_duration.observe(image.preprocess_s)
    return images


def _timed_prepare(data: bytes, pre: Preprocessing, max_pixels: int, defer: bool) -> tuple[PreparedImage, float]:
    start = time.perf_counter()
    return prepare(data, pre, max_pixels, defer=defer), time.perf_counter() - start


async def _run(
    batcher: ImageBatcher, jobs: list[ImageJob], arrived: float, timeout_s: float
) -> list[BatchResult[ImageOutcome]]:
    """The model's output for every job, in order, within timeout_s of the request's arrival (a time.monotonic()
    value), or the ServiceError that answers why there is none."""
    try:
        return await batcher.run(jobs, deadline=arrived + timeout_s)
    except QueueFullError as err:
        raise queue_full(err.retry_after_s) from None
    except BatcherClosedError:
        raise shutting_down() from None
    except DeadlineExceededError:
        raise deadline_exceeded(timeout_s) from None
    except InferenceFailedError as err:
        raise inference_failed(err.cause) from None


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
    predictor: Predictor,
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
