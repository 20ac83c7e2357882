"""Service test helpers shared by tests/app and tests/cli: a running app on the tiny artifact (through ASGITransport +
LifespanManager), a recording predictor, image encoders, metric readers and what the model itself says."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from asgi_lifespan import LifespanManager
from PIL import Image

from app.client import wait_until_ready
from app.config import Settings
from app.main import create_app
from app.service import Service
from model.artifact import load_artifact
from model.inference import Classifier, ImagePrediction
from model.labels import PET_LABELS, PET_SPECIES
from model.preprocess import prepare

Loader = Callable[[Settings], Classifier]


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct random RGB image per seed: the tiny model gives each a different output."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    # PNG is lossless, so the service decodes exactly the pixels the test holds
    return encode(noise_image(seed, size), "PNG")


class RecordingPredictor(Classifier):
    """The real predictor, plus a record of every batch it ran, an optional delay, and optional failures."""

    delay_s: float = 0.0
    fail_when: Callable[[list[torch.Tensor]], BaseException | None] | None = None

    def predict(
        self, images: list[torch.Tensor], heatmaps: list[bool] | None = None, methods: list[str] | None = None
    ) -> list[ImagePrediction]:
        self.batches = getattr(self, "batches", [])
        self.batches.append([img.clone() for img in images])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_when is not None and (error := self.fail_when(images)) is not None:
            raise error
        return super().predict(images, heatmaps, methods)


def recording_loader(artifact: Path, delay_s: float = 0.0, fail_when=None) -> Loader:
    def load(settings: Settings) -> Classifier:
        predictor = RecordingPredictor.from_artifact(artifact, "cpu", "float32")
        predictor.delay_s = 0.0  # warm-up runs undelayed
        predictor.fail_when = None
        predictor.warmup = _warmup_then(predictor, delay_s, fail_when)  # type: ignore[method-assign]
        return predictor

    return load


def _warmup_then(predictor: RecordingPredictor, delay_s: float, fail_when) -> Callable[[list[int]], float]:
    original = predictor.warmup

    def warmup(sizes: list[int]) -> float:
        seconds = original(sizes)
        predictor.batches = []
        predictor.delay_s, predictor.fail_when = delay_s, fail_when
        return seconds

    return warmup


def metric_value(service: Service, name: str, **labels: str) -> float:
    """One sample as the service's registry exports it (0 when the series has not been created yet)."""
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def flushes(service: Service, reason: str) -> float:
    """petvit_batch_flush_total{reason} as the service counted it so far."""
    return metric_value(service, "petvit_batch_flush_total", reason=reason)


def rejected(service: Service, reason: str) -> float:
    """petvit_rejected_total{reason} as the service counted it so far."""
    return metric_value(service, "petvit_rejected_total", reason=reason)


async def until(condition, timeout_s: float = 10.0) -> None:
    """Poll `condition()` on the event loop; fail (rather than hang the suite) if it never holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def make_settings(artifact: Path, **overrides) -> Settings:
    # float32: these tests hold the service's answers to the float32 model's own, digit for digit; what "auto"
    # picks (bfloat16 on CPUs with native bf16) has its own tests.
    base = dict(checkpoint=artifact, device="cpu", dtype="float32", max_batch_size=8, max_wait_ms=5, warmup="pow2")
    return Settings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, loader: Loader | None = None, wait_ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """The app with its lifespan running, once loading has finished (ready or failed)."""
    app = create_app(settings, loader) if loader else create_app(settings)
    service: Service = app.state.service
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://petvit.test", timeout=30) as client:
            if wait_ready:
                for _ in range(2000):
                    if service.models.status not in ("starting", "loading"):
                        break
                    await asyncio.sleep(0.005)
            yield client, service


def direct_probs(artifact: Path, data: bytes) -> torch.Tensor:
    """What the model itself says about these bytes, preprocessed the way the artifact asks."""
    model, meta = load_artifact(artifact, "cpu")
    tensor = prepare(data, meta.preprocessing, 10**9).tensor
    with torch.inference_mode():
        return model(tensor[None]).float().softmax(-1)[0]  # (1, 3, S, S) -> (classes,)


@contextlib.contextmanager
def live_server(settings: Settings, ready_timeout_s: float = 30, loader: Loader | None = None) -> Iterator[str]:
    """A real uvicorn serving the app on a free loopback port, in a thread; yields its base URL once /readyz is 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings, loader) if loader else create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_until_ready(url, timeout=ready_timeout_s, interval=0.01, still_running=thread.is_alive)
        assert ready, "test server never ready"
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def assert_matches_model(result: dict, expected: torch.Tensor, k: int) -> None:
    """A /classify result is the model's own top-k: indices, scores, labels and species."""
    scores, indices = torch.topk(expected, k)
    assert [p["index"] for p in result["predictions"]] == indices.tolist()
    np.testing.assert_allclose([p["score"] for p in result["predictions"]], scores.numpy(), rtol=1e-5, atol=1e-6)
    for p in result["predictions"]:
        assert p["label"] == PET_LABELS[p["index"]] and p["species"] == PET_SPECIES[p["index"]]
