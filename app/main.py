"""create_app(settings) -> FastAPI: the app `petvit serve` runs (cli/serve.py builds it from the checked settings).

Building an app is cheap: the model is loaded in the lifespan, in the background, never at import or construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admission import OverloadFastPath
from app.config import Settings
from app.errors import install_error_handlers
from app.lifecycle import PredictorLoader, load_from_settings
from app.metrics import Metrics
from app.reload import install_sighup_handler
from app.routes import admin, classify, health, metrics, model_info, ui
from app.service import Service

log = logging.getLogger("petvit.app")


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path: /x/{id} stays one series)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # 404s share one series
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, loader: PredictorLoader = load_from_settings) -> FastAPI:
    settings = settings or Settings()
    service = Service.build(settings, loader)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.start(), name="petvit-load")
        restore_sighup = install_sighup_handler(service)  # SIGHUP: reload PETVIT_CHECKPOINT (app/reload.py)
        try:
            yield
        finally:
            restore_sighup()
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await service.stop()

    app = FastAPI(
        title="petvit",
        description="Which of the 37 Oxford-IIIT Pet breeds is in the photo, with attention-rollout heatmaps.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    for router in (classify.router, health.router, model_info.router, metrics.router, ui.router):
        app.include_router(router)
    app.include_router(admin.router if settings.admin_key is not None else admin.disabled_router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key"],
            expose_headers=["Retry-After", "X-Model-SHA256"],
        )
    app.add_middleware(OverloadFastPath, service=service)  # 429 for /classify before FastAPI's own work
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    return app
