"""GET /healthz (the process answers) and GET /readyz (the model is loaded and warmed up)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServiceDep
from app.schemas import ErrorResponse, Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="the process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="the model is loaded and warmed up",
    responses={
        503: {
            "model": ErrorResponse,
            "description": "loading, failed to load (the message says what to do), or stopping",
        }
    },
)
async def readyz(service: ServiceDep) -> Readiness:
    predictor, _ = service.require_ready()
    return Readiness(
        status="ready",
        model=predictor.metadata.name,
        device=str(predictor.device),
        dtype=predictor.dtype_name,
        warmup_s=round(service.warmup_s, 3),
    )
