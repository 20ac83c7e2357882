"""POST /classify: HTTP only. The work is app/pipeline.py's three steps, decode -> predict -> encode, on the model
generation that is live when the request arrives; a refused request is counted once, here."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from app import pipeline
from app.deps import ApiKeyDep, ServiceDep
from app.errors import ServiceError
from app.schemas import (
    CLASSIFY_BODY,
    CLASSIFY_DESCRIPTION,
    DEFAULT_HEATMAP_METHOD,
    ERROR_RESPONSES,
    ClassifyResponse,
    HeatmapMethodQuery,
    HeatmapPngQuery,
    HeatmapQuery,
    TopKQuery,
)

router = APIRouter(tags=["classify"])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="classify one or more pet photos",
    description=CLASSIFY_DESCRIPTION,
    responses=ERROR_RESPONSES,
    dependencies=[ApiKeyDep],
    openapi_extra=CLASSIFY_BODY,
)
async def classify(
    request: Request,
    response: Response,
    service: ServiceDep,
    top_k: TopKQuery = None,
    heatmap: HeatmapQuery = False,
    heatmap_png: HeatmapPngQuery = True,
    heatmap_method: HeatmapMethodQuery = DEFAULT_HEATMAP_METHOD,
) -> ClassifyResponse:
    arrived = time.monotonic()
    options = pipeline.ClassifyOptions(top_k, heatmap, heatmap_png, heatmap_method.value)
    try:
        # Pinned to the model live now (a reload meanwhile does not change who answers), with queue room held for
        # the request's images from before its body is read: refusals come before reading and decoding, not after.
        deadline = arrived + service.settings.request_timeout_s
        with service.models.serving() as generation, generation.batcher.admit(deadline) as admission:
            decoded = await pipeline.decode(request, service, generation, options, admission)
            results = await pipeline.predict(request, service, generation, decoded, options, admission)
            answer = await pipeline.encode(service, generation.predictor, decoded, results, options, arrived)
    except ServiceError as err:
        service.metrics.count_rejection(err)
        raise
    response.headers["X-Model-SHA256"] = answer.model_sha256
    return answer
