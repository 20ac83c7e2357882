"""Refusing overload cheaply: a fast path that refuses POST /classify before FastAPI's routing, dependency
injection and validation (the answers themselves are app/errors.refusal's).

Under 10x overload nine requests in ten are refused; on a CPU the work of refusing them comes out of the model's
own time, so it must cost as little as possible. The fast path asks the live model's batcher whether one more image
could be answered by the request's deadline (DynamicBatcher.check: queue room, then the estimated wait), from the
headers alone, and answers 429 itself when not. Everything else (an API key that is wrong, a body the headers
already refuse, a service not ready) goes on to the route, which answers it as always: the fast path only ever
refuses what the route would refuse too, and the route's own admission (which holds the room) still runs.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.batch_errors import BatcherError
from app.deps import api_key_matches
from app.errors import ServiceError, error_response, refusal
from app.service import Service
from app.uploads import check_headers


class OverloadFastPath:
    """ASGI middleware: 429 for POST /classify when the live model cannot take one more image in time."""

    def __init__(self, app: ASGIApp, service: Service, path: str = "/classify") -> None:
        self.app = app
        self.service = service
        self.path = path  # the route template it guards: RequestMetricsMiddleware labels its refusals with it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ours = scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "POST"
        if ours and (error := self._refusal(Request(scope))) is not None:
            scope["route"] = self  # has .path, like the route it answers for
            self.service.metrics.count_rejection(error)
            await error_response(error.status, error.code, error.message, error.headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> ServiceError | None:
        models, settings = self.service.models, self.service.settings
        generation = models.live
        if not models.ready or generation is None:
            return None
        if not api_key_matches(settings, request.headers.get("x-api-key")):
            return None  # 401 first: the route says so
        try:
            check_headers(request, settings.max_upload_bytes, settings.max_files)
        except ServiceError:
            return None  # 415/413/400: never a 429 for a request that can never be served
        try:
            generation.batcher.check(1, time.monotonic() + settings.request_timeout_s)
        except BatcherError as err:
            return refusal(err, settings.request_timeout_s)
        return None
