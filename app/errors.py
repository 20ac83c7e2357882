"""Every failure answers `{"error": {"code", "message"}}` with the HTTP status of its kind (the table in
docs/service.md: 400 bad input, 413 too big, 429 queue full, 503 not ready, 504 past the deadline, ...).

ServiceError carries the three parts, and the constructors below build every one the service raises, so each code
is spelt here and nowhere else; the handlers at the end also translate FastAPI's own 404/405/422 and any unexpected
exception, so no client ever has to parse an HTML page or a bare `{"detail": ...}`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("petvit.errors")


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


# Constructors for the errors the service raises, so each code is spelt in one place.
def bad_image(message: str) -> ServiceError:
    return ServiceError(400, "undecodable_image", message)


def malformed_multipart(message: str) -> ServiceError:
    return ServiceError(400, "malformed_multipart", message)


def client_disconnected() -> ServiceError:
    # Nobody reads this answer; it still ends the request as a refusal, counted like a bad upload.
    return ServiceError(400, "client_disconnected", "the client closed the connection mid-upload")


def in_image(error: ServiceError, number: int, filename: str | None) -> ServiceError:
    """The same error, its message led by which image of the request it is about: "image 2 (cat.png): ..."."""
    name = f"image {number}" + (f" ({filename})" if filename else "")
    return ServiceError(error.status, error.code, f"{name}: {error.message}", error.headers)


def unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or wrong API key: send it in the X-API-Key header")


# 413 in its three kinds: too many bytes (checked while reading), too many pixels (from the header, before
# decoding), too many images in one request.
def upload_too_large(message: str) -> ServiceError:
    return ServiceError(413, "upload_too_large", message)


def image_too_large(message: str) -> ServiceError:
    return ServiceError(413, "image_too_large", message)


def too_many_files(max_files: int) -> ServiceError:
    return ServiceError(413, "too_many_files", f"at most {max_files} images per request")


def unsupported_type(message: str) -> ServiceError:
    return ServiceError(415, "unsupported_media_type", message)


def invalid_parameters(message: str) -> ServiceError:
    return ServiceError(422, "invalid_parameters", message)


def wrong_field(name: str | None, field: str) -> ServiceError:
    got = f"`{name}`" if name else "a part without a name"
    return ServiceError(422, "wrong_field", f"images go in multipart fields named `{field}`; this request sent {got}")


def no_images(field: str) -> ServiceError:
    return ServiceError(422, "no_images", f"no images: send them as multipart fields named `{field}`")


def queue_full(retry_after_s: int) -> ServiceError:
    return ServiceError(
        429,
        "queue_full",
        f"the service is at capacity; retry in about {retry_after_s} s",
        {"Retry-After": str(retry_after_s)},
    )


def overloaded(retry_after_s: int, estimated_s: float, left_s: float) -> ServiceError:
    return ServiceError(
        429,
        "overloaded",
        f"the service would answer in about {estimated_s:.1f} s, after this request's deadline ({max(left_s, 0):.1f} s "
        f"left); retry in about {retry_after_s} s",
        {"Retry-After": str(retry_after_s)},
    )


# POST /v1/admin/reload and SIGHUP: the old model keeps serving whenever a reload is refused.
def admin_unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or wrong admin key: send it in the X-Admin-Key header")


def admin_disabled() -> ServiceError:
    # Still 404 `not_found` (the route is not there), but saying what turns it on rather than "no route".
    return ServiceError(
        404,
        "not_found",
        "POST /v1/admin/reload is off on this server: setting PETVIT_ADMIN_KEY turns it on, and it then needs that "
        "key in header X-Admin-Key (SIGHUP reloads PETVIT_CHECKPOINT without it)",
    )


def checkpoint_not_allowed(requested: str, folders: Sequence[Path]) -> ServiceError:
    """The admin key lets its holder change the model, not read the server's files: a reload loads only from the
    model folders. The message names the path as sent, never what it resolves to."""
    listed = ", ".join(str(folder) for folder in folders)
    return ServiceError(
        403,
        "checkpoint_not_allowed",
        f"{requested} is outside the folders a reload may load from ({listed}), with symlinks and `..` followed; "
        "put the artifact in one of them, or add its folder to PETVIT_MODEL_DIRS; the current model keeps serving",
    )


def reload_busy(message: str) -> ServiceError:
    return ServiceError(409, "reload_in_progress", message)


def artifact_refused(message: str) -> ServiceError:
    """The new artifact cannot be served (missing, a pickle, truncated, wrong shapes, not a ViT): the reason is the
    loader's own message."""
    return ServiceError(422, "invalid_artifact", f"{message}; the current model keeps serving")


def insufficient_gpu_memory(message: str) -> ServiceError:
    # 409: the conflict is with the server's state (the live model holds the memory), not with the artifact.
    return ServiceError(409, "insufficient_gpu_memory", f"{message}; the current model keeps serving")


def reload_failed(message: str) -> ServiceError:
    return ServiceError(
        500, "reload_failed", f"the new model could not be loaded: {message}; the current model keeps serving"
    )


def inference_failed(cause: BaseException) -> ServiceError:
    return ServiceError(500, "inference_failed", f"the model failed on this batch: {cause}")


def not_ready(message: str) -> ServiceError:
    return ServiceError(503, "not_ready", message, {"Retry-After": "5"})


def shutting_down() -> ServiceError:
    return ServiceError(503, "shutting_down", "the service is shutting down; retry on another replica")


def deadline_exceeded(timeout_s: float) -> ServiceError:
    return ServiceError(504, "deadline_exceeded", f"no answer within the {timeout_s:g} s request deadline; retry later")


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=dict(headers or {}))


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
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
        return error_response(500, "internal_error", "the service failed unexpectedly; the error is in its log")
