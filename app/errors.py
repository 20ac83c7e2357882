"""Every failure answers `{"error": {"code", "message"}}` with the HTTP status of its kind (the table in
docs/service.md: 400 bad input, 413 too big, 429 queue full, 503 not ready, 504 past the deadline, ...).

ErrorCode is every code with its status and the reasons the metrics count it under; ServiceError carries a code, its
message and headers, and the constructors below build every one the service raises, so each code is spelt here and
nowhere else; the handlers at the end also translate FastAPI's own 404/405/422 and any unexpected
exception, so no client ever has to parse an HTML page or a bare `{"detail": ...}`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import Enum
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.batch_errors import (
    BatcherClosedError,
    BatcherError,
    DeadlineExceededError,
    InferenceFailedError,
    OverloadedError,
    QueueFullError,
)
from model.preprocess import ImageRejected

log = logging.getLogger("petvit.errors")


class ErrorCode(str, Enum):
    """Every error code the service answers with, and what each carries: its HTTP status; the reason
    petvit_rejected_total counts a refused /classify request under (None: the service's own failure, or not a
    refusal of a request to classify); and the outcome petvit_reloads_total counts a refused reload under.
    Dashboards and alerts match the reasons and outcomes (tests/deploy checks them)."""

    status: HTTPStatus
    reason: str | None
    reload_outcome: str

    def __new__(cls, code: str, status: int, reason: str | None = None, reload_outcome: str = "failed") -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = HTTPStatus(status)
        member.reason = reason
        member.reload_outcome = reload_outcome
        return member

    # 400: the upload itself
    undecodable_image = ("undecodable_image", 400, "bad_image")
    malformed_multipart = ("malformed_multipart", 400, "bad_image")
    # Nobody reads this answer; it still ends the request as a refusal, counted like a bad upload.
    client_disconnected = ("client_disconnected", 400, "disconnected")
    bad_request = ("bad_request", 400, "bad_image")
    unauthorized = ("unauthorized", 401)  # app/deps.py counts the API key's refusals itself, before the route runs
    forbidden = ("forbidden", 403)
    # a reload path outside the model folders: the admin key changes the model, it does not read the server's files
    checkpoint_not_allowed = ("checkpoint_not_allowed", 403, None, "forbidden")
    not_found = ("not_found", 404)
    method_not_allowed = ("method_not_allowed", 405)
    reload_in_progress = ("reload_in_progress", 409, None, "busy")
    # 409: the conflict is with the server's state (the live model holds the memory), not with the artifact.
    insufficient_gpu_memory = ("insufficient_gpu_memory", 409, None, "no_memory")
    # 413 in its kinds: too many bytes (checked while reading), too many pixels (from the header, before decoding),
    # too many images in one request.
    upload_too_large = ("upload_too_large", 413, "too_large")
    image_too_large = ("image_too_large", 413, "too_large")
    too_many_files = ("too_many_files", 413, "too_large")
    payload_too_large = ("payload_too_large", 413, "too_large")
    unsupported_media_type = ("unsupported_media_type", 415, "unsupported_type")
    invalid_parameters = ("invalid_parameters", 422, "bad_request")
    wrong_field = ("wrong_field", 422, "bad_request")
    no_images = ("no_images", 422, "bad_request")
    invalid_artifact = ("invalid_artifact", 422, None, "refused")
    queue_full = ("queue_full", 429, "queue_full")
    overloaded = ("overloaded", 429, "overloaded")  # by deadline: the estimated wait is longer than what is left
    internal_error = ("internal_error", 500)
    inference_failed = ("inference_failed", 500)
    reload_failed = ("reload_failed", 500)
    not_ready = ("not_ready", 503, "not_ready")
    shutting_down = ("shutting_down", 503, "shutting_down")
    deadline_exceeded = ("deadline_exceeded", 504, "deadline")


class ServiceError(Exception):
    """A failure answered as `{"error": {"code", "message"}}` with its code's status (and headers, e.g. Retry-After).
    `code` is the plain string clients see; `kind` the ErrorCode it comes from."""

    def __init__(self, kind: ErrorCode, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = int(kind.status)
        self.code = kind.value
        self.message = message
        self.headers = dict(headers or {})


# Constructors for the errors the service raises, each with the message that says what to do.
def bad_image(message: str) -> ServiceError:
    return ServiceError(ErrorCode.undecodable_image, message)


def rejected_image(error: ImageRejected) -> ServiceError:
    """What model.preprocess refused an upload for, answered with that kind's status (400/413/415)."""
    # a lookup by value; mypy reads ErrorCode(...) as a call of the members' own __new__ (code, status, ...)
    return ServiceError(ErrorCode(error.code), error.message)  # type: ignore[call-arg]


def malformed_multipart(message: str) -> ServiceError:
    return ServiceError(ErrorCode.malformed_multipart, message)


def client_disconnected() -> ServiceError:
    return ServiceError(ErrorCode.client_disconnected, "the client closed the connection mid-upload")


def in_image(error: ServiceError, number: int, filename: str | None) -> ServiceError:
    """The same error, its message led by which image of the request it is about: "image 2 (cat.png): ..."."""
    name = f"image {number}" + (f" ({filename})" if filename else "")
    return ServiceError(error.kind, f"{name}: {error.message}", error.headers)


def unauthorized() -> ServiceError:
    return ServiceError(ErrorCode.unauthorized, "missing or wrong API key: send it in the X-API-Key header")


def upload_too_large(message: str) -> ServiceError:
    return ServiceError(ErrorCode.upload_too_large, message)


def too_many_files(max_files: int) -> ServiceError:
    return ServiceError(ErrorCode.too_many_files, f"at most {max_files} images per request")


def unsupported_type(message: str) -> ServiceError:
    return ServiceError(ErrorCode.unsupported_media_type, message)


def invalid_parameters(message: str) -> ServiceError:
    return ServiceError(ErrorCode.invalid_parameters, message)


def wrong_field(name: str | None, field: str) -> ServiceError:
    got = f"`{name}`" if name else "a part without a name"
    return ServiceError(
        ErrorCode.wrong_field, f"images go in multipart fields named `{field}`; this request sent {got}"
    )


def no_images(field: str) -> ServiceError:
    return ServiceError(ErrorCode.no_images, f"no images: send them as multipart fields named `{field}`")


def queue_full(retry_after_s: int) -> ServiceError:
    return ServiceError(
        ErrorCode.queue_full,
        f"the service is at capacity; retry in about {retry_after_s} s",
        {"Retry-After": str(retry_after_s)},
    )


def overloaded(retry_after_s: int, estimated_s: float, left_s: float) -> ServiceError:
    return ServiceError(
        ErrorCode.overloaded,
        f"the service would answer in about {estimated_s:.1f} s, after this request's deadline ({max(left_s, 0):.1f} s "
        f"left); retry in about {retry_after_s} s",
        {"Retry-After": str(retry_after_s)},
    )


# POST /v1/admin/reload and SIGHUP: the old model keeps serving whenever a reload is refused.
def admin_unauthorized() -> ServiceError:
    return ServiceError(ErrorCode.unauthorized, "missing or wrong admin key: send it in the X-Admin-Key header")


def admin_disabled() -> ServiceError:
    # Still 404 `not_found` (the route is not there), but saying what turns it on rather than "no route".
    return ServiceError(
        ErrorCode.not_found,
        "POST /v1/admin/reload is off on this server: setting PETVIT_ADMIN_KEY turns it on, and it then needs that "
        "key in header X-Admin-Key (SIGHUP reloads PETVIT_CHECKPOINT without it)",
    )


def checkpoint_not_allowed(requested: str, folders: Sequence[Path]) -> ServiceError:
    """The admin key lets its holder change the model, not read the server's files: a reload loads only from the
    model folders. The message names the path as sent, never what it resolves to."""
    listed = ", ".join(str(folder) for folder in folders)
    return ServiceError(
        ErrorCode.checkpoint_not_allowed,
        f"{requested} is outside the folders a reload may load from ({listed}), with symlinks and `..` followed; "
        "put the artifact in one of them, or add its folder to PETVIT_MODEL_DIRS; the current model keeps serving",
    )


def reload_busy(message: str) -> ServiceError:
    return ServiceError(ErrorCode.reload_in_progress, message)


def artifact_refused(message: str) -> ServiceError:
    """The new artifact cannot be served (missing, a pickle, truncated, wrong shapes, not a ViT): the reason is the
    loader's own message."""
    return ServiceError(ErrorCode.invalid_artifact, f"{message}; the current model keeps serving")


def insufficient_gpu_memory(message: str) -> ServiceError:
    return ServiceError(ErrorCode.insufficient_gpu_memory, f"{message}; the current model keeps serving")


def reload_failed(message: str) -> ServiceError:
    return ServiceError(
        ErrorCode.reload_failed,
        f"the new model could not be loaded: {message}; the current model keeps serving",
    )


def inference_failed(cause: BaseException) -> ServiceError:
    return ServiceError(ErrorCode.inference_failed, f"the model failed on this batch: {cause}")


def not_ready(message: str) -> ServiceError:
    return ServiceError(ErrorCode.not_ready, message, {"Retry-After": "5"})


def shutting_down() -> ServiceError:
    return ServiceError(ErrorCode.shutting_down, "the service is shutting down; retry on another replica")


def deadline_exceeded(timeout_s: float) -> ServiceError:
    return ServiceError(
        ErrorCode.deadline_exceeded, f"no answer within the {timeout_s:g} s request deadline; retry later"
    )


def refusal(err: BatcherError, timeout_s: float) -> ServiceError:
    """The answer to a batcher's refusal or failure."""
    if isinstance(err, OverloadedError):
        return overloaded(err.retry_after_s, err.estimated_s, err.left_s)
    if isinstance(err, QueueFullError):
        return queue_full(err.retry_after_s)
    if isinstance(err, BatcherClosedError):
        return shutting_down()
    if isinstance(err, DeadlineExceededError):
        return deadline_exceeded(timeout_s)
    assert isinstance(err, InferenceFailedError)
    return inference_failed(err.cause)


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=dict(headers or {}))


# FastAPI's and Starlette's own errors (404 unknown route, 405, ...), by status.
_HTTP_CODES: dict[int, ErrorCode] = {
    code.status: code
    for code in (
        ErrorCode.bad_request,
        ErrorCode.unauthorized,
        ErrorCode.forbidden,
        ErrorCode.not_found,
        ErrorCode.method_not_allowed,
        ErrorCode.payload_too_large,
        ErrorCode.unsupported_media_type,
    )
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        known = _HTTP_CODES.get(exc.status_code)
        code = known.value if known is not None else f"http_{exc.status_code}"
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "header"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return await _service_error(request, invalid_parameters("; ".join(parts) or "invalid request parameters"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = ServiceError(ErrorCode.internal_error, "the service failed unexpectedly; the error is in its log")
        return await _service_error(request, error)
