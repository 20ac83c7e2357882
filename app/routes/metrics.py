"""GET /metrics in Prometheus' text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import ServiceDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (petvit_*)")
async def metrics(service: ServiceDep) -> Response:
    if service.models.predictor is not None:
        service.metrics.update_gpu_memory(service.models.predictor.device)
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
