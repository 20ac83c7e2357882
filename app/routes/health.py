"""GET /healthz (the process answers) and GET /readyz (the model is loaded and warmed up)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServiceDep
from app.errors import ServiceError
from app.schemas import ErrorResponse, Health, Readiness
from model.host_paths import in_host_terms

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
    try:
        predictor, _ = service.models.require_ready()
    except ServiceError as err:
        # The advice as the operator types it: under compose, its host folders and `docker compose run ...`
        # (docker-compose.yml says how, model/host_paths.py); elsewhere the message is unchanged.
        raise ServiceError(err.kind, in_host_terms(err.message), err.headers) from None
    return Readiness(
        status="ready",
        model=predictor.metadata.name,
        device=str(predictor.device),
        dtype=predictor.dtype_name,
        warmup_s=round(service.models.warmup_s, 3),
    )
