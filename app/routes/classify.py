"""POST /classify: uploads -> preprocessing (thread pool) -> DynamicBatcher -> top-k (+ heatmaps)."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request

from app.batcher import BatcherClosedError, BatchResult, DeadlineExceededError, DynamicBatcher, QueueFullError
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
from app.lifecycle import ServiceLifecycle
from app.predictor import Predictor
from app.preprocess import PreparedImage, Preprocessing, prepare
from app.schemas import ERROR_RESPONSES, ClassifyResponse, Heatmap, ImageResult, Prediction, Timings
from app.uploads import FILE_FIELD, read_uploads

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


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _timed_prepare(data: bytes, pre: Preprocessing, max_pixels: int) -> tuple[PreparedImage, float]:
    start = time.perf_counter()
    return prepare(data, pre, max_pixels), time.perf_counter() - start


def _timed_overlay(prepared: PreparedImage, grid: torch.Tensor) -> tuple[str, float]:
    # The overlay needs only the upload's size and the crop box, not its pixels: the client composes it.
    start = time.perf_counter()
    return overlay_png_base64(grid, prepared.size, prepared.crop_box), time.perf_counter() - start


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="classify one or more pet photos",
    description=(
        "Send images as multipart fields named `file` (repeat the field for several, up to PETVIT_MAX_FILES) or one "
        "image as the raw body with an `image/*` Content-Type. Each image gets its top-k breeds, sorted by score; "
        "`heatmap=true` adds the attention-rollout grid and a transparent PNG overlay at the image's own size (heat "
        "over the crop the model saw, a dark veil outside it) for the client to lay over the photo."
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
) -> ClassifyResponse:
    arrived = time.monotonic()
    try:
        with service.serving() as (predictor, batcher):
            return await _classify(request, service, predictor, batcher, top_k, heatmap, heatmap_png, arrived)
    except ServiceError as err:
        service.metrics.count_rejection(err)
        raise


async def _classify(
    request: Request,
    service: ServiceLifecycle,
    predictor: Predictor,
    batcher: DynamicBatcher,
    top_k: int | None,
    heatmap: bool,
    heatmap_png: bool,
    arrived: float,
) -> ClassifyResponse:
    settings, metrics = service.settings, service.metrics
    # PETVIT_DEFAULT_TOP_K is a preference, not the client's request: a model with fewer labels caps it, not a 422.
    k = min(settings.default_top_k, len(predictor.labels)) if top_k is None else top_k
    if k > len(predictor.labels):
        raise invalid_parameters(f"top_k must be between 1 and {len(predictor.labels)}, got {k}")
    deadline = arrived + settings.request_timeout_s

    uploads = await read_uploads(request, settings.max_upload_bytes, settings.max_files)
    loop = asyncio.get_running_loop()
    pre = predictor.preprocessing
    jobs = [
        loop.run_in_executor(service.preprocess_pool, partial(_timed_prepare, u.data, pre, settings.max_pixels))
        for u in uploads
    ]
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    for number, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True), start=1):
        if isinstance(outcome, ServiceError):
            raise in_image(outcome, number, upload.filename)
        if isinstance(outcome, BaseException):
            raise outcome
    prepared = [outcome[0] for outcome in outcomes]
    for _, seconds in outcomes:
        metrics.preprocess_duration.observe(seconds)

    try:
        futures = batcher.submit([(p.tensor, heatmap) for p in prepared], deadline)
    except QueueFullError as err:
        raise queue_full(err.retry_after_s) from None
    except BatcherClosedError:
        raise shutting_down() from None
    try:
        results: list[BatchResult] = await asyncio.wait_for(
            asyncio.gather(*futures), max(0.0, deadline - time.monotonic())
        )
    except (asyncio.TimeoutError, DeadlineExceededError):
        for f in futures:
            f.cancel()  # queued items the worker has not reached yet will be skipped
        raise deadline_exceeded(settings.request_timeout_s) from None
    except Exception as err:
        for f in futures:
            f.cancel()  # the request fails as a whole; its other images need not run
        raise inference_failed(err) from None

    overlays: list[tuple[str | None, float] | None] = [None] * len(prepared)
    if heatmap and not heatmap_png:
        overlays = [(None, 0.0)] * len(prepared)
    elif heatmap:
        overlays = await asyncio.gather(
            *(
                loop.run_in_executor(service.preprocess_pool, _timed_overlay, p, r.value.grid)
                for p, r in zip(prepared, results, strict=True)
            )
        )
    answers = []
    for upload, p, (_, pre_s), r, overlay in zip(uploads, prepared, outcomes, results, overlays, strict=True):
        grid = r.value.grid
        answers.append(
            ImageResult(
                filename=upload.filename,
                width=p.size[0],
                height=p.size[1],
                predictions=[Prediction(**p) for p in predictor.top_k(r.value.probs, k)],
                heatmap=(
                    Heatmap(grid=grid.tolist(), png=overlay[0], rows=grid.shape[0], cols=grid.shape[1])
                    if overlay is not None and grid is not None
                    else None
                ),
                timings=Timings(
                    preprocess_ms=_ms(pre_s),
                    queue_ms=_ms(r.queue_wait_s),
                    inference_ms=_ms(r.inference_s),
                    batch_size=r.batch_size,
                    heatmap_ms=_ms(overlay[1]) if overlay is not None else None,
                ),
            )
        )
    metrics.images.inc(len(answers))
    return ClassifyResponse(
        model=str(predictor.metadata.get("name")),
        results=answers,
        timings={"total_ms": _ms(time.monotonic() - arrived)},
    )
