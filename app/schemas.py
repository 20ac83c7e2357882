"""Response bodies, named by role. The examples feed the OpenAPI page at /docs."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from app.uploads import FILE_FIELD
from model.explain import DEFAULT_METHOD


class HeatmapMethodName(str, Enum):
    """POST /classify's heatmap_method: the keys of model.explain.SERVICE_METHODS (a test keeps them equal)."""

    rollout = "rollout"
    gradient = "gradient"


DEFAULT_HEATMAP_METHOD = HeatmapMethodName(DEFAULT_METHOD)


class Prediction(BaseModel):
    """Hugging Face's image-classification shape, plus species and the class index."""

    label: str = Field(examples=["Abyssinian"])
    score: float = Field(ge=0, le=1, examples=[0.93])
    species: str = Field(examples=["cat"])
    index: int = Field(ge=0, examples=[0])


class Heatmap(BaseModel):
    grid: list[list[float]] = Field(description="the heatmap, patch rows x cols, each in [0, 1] (1: the hottest)")
    method: str = Field(description="the heatmap_method that made it", examples=["rollout"])
    png: str | None = Field(
        description="base64 PNG overlay with the upload's aspect ratio, at most 512 px on its longer side (smaller "
        "uploads: their own size), to stretch over the photo as shown: heat colours (more opaque where hotter) over "
        "the centre crop the model saw, a translucent dark veil outside it, no photo pixels; palette + tRNS, decodes "
        "to RGBA (null when heatmap_png=false: the grid alone, e.g. for phone photos on a slow link)"
    )
    rows: int
    cols: int


class Timings(BaseModel):
    preprocess_ms: float = Field(description="decode, resize and crop of this image")
    queue_ms: float = Field(description="waiting for a batch")
    inference_ms: float = Field(description="the forward pass of the batch this image was in")
    batch_size: int = Field(description="images in that forward pass")
    heatmap_ms: float | None = Field(None, description="rendering the PNG overlay")


class ImageResult(BaseModel):
    filename: str | None = Field(None, examples=["chelsea.jpg"])
    width: int
    height: int
    predictions: list[Prediction]
    unknown: bool | None = Field(
        None,
        description='true: the image looks like none of the model\'s classes ("no pet recognised"), its open-set '
        "score is above the threshold; the predictions are still the model's best guesses. null: the model has "
        "no open-set threshold (docs/trust.md)",
    )
    ood_score: float | None = Field(
        None, description="the open-set score (higher: less like any class; its kind and threshold are at /v1/model)"
    )
    heatmap: Heatmap | None = None
    timings: Timings


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "petvit-b16",
                    "results": [
                        {
                            "filename": "chelsea.jpg",
                            "width": 451,
                            "height": 300,
                            "predictions": [
                                {"label": "Egyptian Mau", "score": 0.71, "species": "cat", "index": 11},
                                {"label": "Bengal", "score": 0.12, "species": "cat", "index": 5},
                            ],
                            "unknown": False,
                            "ood_score": 41.7,
                            "heatmap": None,
                            "timings": {"preprocess_ms": 3.1, "queue_ms": 4.8, "inference_ms": 38.0, "batch_size": 6},
                        }
                    ],
                    "timings": {"total_ms": 49.7},
                    "model_sha256": "9f2c...e41a",
                }
            ]
        }
    )
    model: str
    model_sha256: str = Field(
        description="sha256 of the artifact that answered (also in header X-Model-SHA256): across a reload, each "
        "answer comes entirely from one model"
    )
    results: list[ImageResult]
    timings: dict[str, float]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["image_too_large"])
    message: str = Field(examples=["the image is 20000x20000 = 400000000 pixels; the limit is 40000000"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model: str
    device: str
    dtype: str
    warmup_s: float


class ModelInfo(BaseModel):
    name: str = Field(examples=["petvit-b16"])
    variant: str | None = Field(examples=["b16"])
    architecture: str
    trained: bool = Field(description="false for random or ImageNet-initialised heads: predictions mean nothing")
    num_labels: int
    labels: list[str]
    species: list[str]
    image_size: int
    preprocessing: dict[str, Any]
    evaluation: dict[str, Any]
    calibration: dict[str, Any] | None = Field(
        None, description="temperature scaling: scores are softmax(logits / temperature); null: uncalibrated"
    )
    open_set: dict[str, Any] | None = Field(
        None,
        description="how `unknown` is decided: the score, the threshold in force and where it comes from "
        "(artifact or PETVIT_UNKNOWN_THRESHOLD); null: the model has none and `unknown` is always null",
    )
    sha256: str
    device: str
    dtype: str
    serving: Literal["eager", "compiled"] = Field(
        description="which forward answers: the eager model (at start, and whenever the compiled one was refused) "
        "or the torch.compile'd one (PETVIT_COMPILE, int8), once it agreed with eager float32"
    )
    compile: Literal["off", "compiling", "agreed", "disagreed", "failed"] = Field(
        description="the compiled model built behind the eager one: off (not asked for), compiling, agreed (it "
        "serves), disagreed (its answers were off eager float32's on the probe batch) or failed (compiling raised); "
        "after disagreed or failed the eager model keeps serving and the service log says why"
    )
    parameters: int
    checkpoint: str | None = Field(None, description="the artifact's path on the server (changes on reload)")


class ReloadRequest(BaseModel):
    checkpoint: str | None = Field(
        None,
        description="artifact path on the server; default PETVIT_CHECKPOINT",
        examples=["artifacts/new.safetensors"],
    )


class ReloadResponse(BaseModel):
    status: str = "reloaded"
    model: str = Field(examples=["petvit-b16"])
    sha256: str = Field(description="the model now serving")
    previous_sha256: str | None = Field(description="the model it replaced (null: none was serving)")
    checkpoint: str
    load_s: float = Field(description="checks, load and warm-up, while the old model served")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "an image could not be decoded",
        401: "API key missing or wrong (only when PETVIT_API_KEY is set)",
        413: "too many bytes, pixels or files",
        415: "not an image type the service reads",
        422: "bad parameters",
        429: "queue full, or the estimated wait is longer than the request deadline; see Retry-After",
        503: "model not loaded or warmed up yet, or shutting down",
        504: "no answer within the request deadline",
    }.items()
}


# ------------------------------------------------------------------------------------------- POST /classify's API
# The route's parameters and body as OpenAPI shows them (app/routes/classify.py declares the route with these).
CLASSIFY_DESCRIPTION = (
    "Send images as multipart fields named `file` (repeat the field for several, up to PETVIT_MAX_FILES) or one "
    "image as the raw body with an `image/*` Content-Type. Each image gets its top-k breeds, sorted by score; "
    "`heatmap=true` adds the heatmap grid and a transparent PNG overlay at the image's own size (heat "
    "over the crop the model saw, a dark veil outside it) for the client to lay over the photo; `heatmap_method` "
    "chooses the heatmap."
)
TopKQuery = Annotated[int | None, Query(ge=1, description="how many breeds per image (1..number of labels)")]
HeatmapQuery = Annotated[bool, Query(description="add an attention-rollout heatmap per image")]
HeatmapPngQuery = Annotated[
    bool,
    Query(
        description="with heatmap=true, also render the PNG overlay (false: the grid only, for clients that "
        "draw it themselves)"
    ),
]
HeatmapMethodQuery = Annotated[
    HeatmapMethodName,
    Query(
        description="with heatmap=true, which heatmap: `rollout` (default: attention rollout, heads averaged, the "
        "weakest 90% of each token's links dropped per block; the best measured) or `gradient` (gradient "
        "rollout, specific to the top breed; adds a backward pass, about 2-3x the heatmap's inference time)"
    ),
]
CLASSIFY_BODY = {
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
