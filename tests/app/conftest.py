"""App fixtures: settings, a ready client, and a client + service pair with a recording predictor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.service import Service

from .fixtures import make_settings, recording_loader, running_app


@pytest.fixture
def settings(tiny_artifact: Path) -> Settings:
    return make_settings(tiny_artifact)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as (http, service):
        assert service.models.ready, service.models.message
        yield http


@pytest.fixture
async def served(tiny_artifact: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """Client plus service state, with a recording predictor (tests read predictor.batches)."""
    async with running_app(make_settings(tiny_artifact), recording_loader(tiny_artifact)) as pair:
        assert pair[1].models.ready, pair[1].models.message
        yield pair
