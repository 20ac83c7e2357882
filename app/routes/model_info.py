"""GET /v1/model: what is being served, from the artifact's own metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import ServiceDep
from app.schemas import ERROR_RESPONSES, ModelInfo
from model.inference import Classifier

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelInfo, responses={503: ERROR_RESPONSES[503]})
async def model_info(service: ServiceDep) -> ModelInfo:
    predictor, _ = service.models.require_ready()
    checkpoint = str(service.models.live.checkpoint) if service.models.live is not None else None
    meta = predictor.metadata
    return ModelInfo(
        name=meta.name,
        variant=meta.variant,
        architecture=predictor.architecture,
        trained=meta.trained,
        num_labels=len(predictor.labels),
        labels=predictor.labels,
        species=predictor.species,
        image_size=predictor.image_size,
        preprocessing=meta.preprocessing.to_dict(),
        evaluation=dict(meta.evaluation),
        calibration=meta.calibration.to_dict() if meta.calibration else None,
        open_set=open_set_info(predictor, service.settings.unknown_threshold),
        sha256=predictor.sha256,
        device=str(predictor.device),
        dtype=predictor.dtype_name,
        serving="compiled" if predictor.compiled else "eager",
        compile=service.models.compile_state.value,
        parameters=predictor.model.num_parameters(),
        checkpoint=checkpoint,
    )


def open_set_info(predictor: Classifier, override: float | None) -> dict[str, Any] | None:
    """The artifact's open-set record plus the threshold this service applies and where it comes from."""
    if predictor.open_set is None:
        return None
    return {
        **predictor.open_set.to_dict(),
        "threshold_in_force": predictor.unknown_threshold(override),
        "threshold_source": "PETVIT_UNKNOWN_THRESHOLD" if override is not None else "artifact",
    }
