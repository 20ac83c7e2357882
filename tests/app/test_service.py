"""app/service.py: the Service owns what requests share; the lifecycle holds the model generations only."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .fixtures import make_settings, png_bytes, running_app


async def test_the_service_owns_the_shared_parts_and_closes_the_pool_after_the_drain(tiny_artifact: Path) -> None:
    async with running_app(make_settings(tiny_artifact)) as (client, service):
        models = service.models
        assert models.ready, models.message
        # handed to the lifecycle (it labels generations with them), built and owned by the Service
        assert models.settings is service.settings and models.metrics is service.metrics
        assert not any(isinstance(value, ThreadPoolExecutor) for value in vars(models).values())
        files = {"file": ("cat.png", png_bytes(0), "image/png")}
        answer = await client.post("/classify", files=files, params={"heatmap": "true"})  # decode + PNG: the pool
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["heatmap"]["png"].startswith("iVBOR")  # base64 of PNG's signature
        assert service.pool.submit(lambda: 7).result() == 7
    with pytest.raises(RuntimeError, match="shutdown"):  # stop(): the generations drained first, then the pool
        service.pool.submit(lambda: 7)
