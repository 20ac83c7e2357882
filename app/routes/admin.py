"""POST /v1/admin/reload: swap in a new model with no downtime (app/reload.py). `router` is mounted only when
PETVIT_ADMIN_KEY is set, and needs that key in header X-Admin-Key; otherwise `disabled_router` answers the path with a
404 that says which setting turns it on (and the route stays out of the OpenAPI schema)."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header

from app.deps import ServiceDep
from app.errors import admin_disabled, admin_unauthorized
from app.reload import reload_model
from app.schemas import ERROR_RESPONSES, ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"])
disabled_router = APIRouter(prefix="/v1/admin")


def require_admin_key(
    service: ServiceDep,
    x_admin_key: Annotated[str | None, Header(description="the service's PETVIT_ADMIN_KEY")] = None,
) -> None:
    expected = service.settings.admin_key
    # compare_digest: the time taken must not reveal how much of the key was right
    if expected is None or x_admin_key is None:
        raise admin_unauthorized()
    if not hmac.compare_digest(x_admin_key.encode(), expected.get_secret_value().encode()):
        raise admin_unauthorized()


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="load a new model beside the live one, then swap it in",
    description=(
        "Loads `checkpoint` (default: PETVIT_CHECKPOINT, read again from disk) and warms it up while the live model "
        "keeps serving, then swaps it in at once: each request is answered entirely by the model it was admitted "
        "to, and every /classify answer names its model's sha256. A refused reload leaves the live model serving. "
        "SIGHUP does the same with PETVIT_CHECKPOINT. `checkpoint` must lie in a model folder (PETVIT_CHECKPOINT's, "
        "or one of PETVIT_MODEL_DIRS) once symlinks and `..` are followed."
    ),
    dependencies=[Depends(require_admin_key)],
    responses={
        400: {"model": ErrorResponse, "description": "the body is not valid JSON"},
        401: {"model": ErrorResponse, "description": "X-Admin-Key missing or wrong"},
        403: {"model": ErrorResponse, "description": "`checkpoint` lies outside the model folders"},
        409: {"model": ErrorResponse, "description": "another reload is running, or it would not fit in GPU memory"},
        422: {"model": ErrorResponse, "description": "the artifact cannot be served (the message says why)"},
        500: {"model": ErrorResponse, "description": "the new model failed to load or warm up"},
        503: ERROR_RESPONSES[503],
    },
)
async def reload(service: ServiceDep, request: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    checkpoint = Path(request.checkpoint) if request is not None and request.checkpoint else None
    reloaded = await reload_model(service, checkpoint)
    predictor = reloaded.generation.predictor
    return ReloadResponse(
        model=predictor.metadata.name,
        sha256=predictor.sha256,
        previous_sha256=reloaded.previous_sha256,
        checkpoint=str(reloaded.generation.checkpoint),
        load_s=round(reloaded.seconds, 3),
    )


@disabled_router.post("/reload", include_in_schema=False)
async def reload_disabled() -> None:
    raise admin_disabled()
