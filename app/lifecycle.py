"""The service's lifecycle: starting -> loading -> ready | failed, then shutting_down; and what it holds on the way
(settings, metrics, the preprocessing thread pool and, once loaded, the predictor and its batcher).

Loading happens in the background so /healthz and /readyz answer from the first second: a big model's load and
warm-up can take minutes on a GPU node, and a liveness probe must not kill the pod meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from app.batcher import DynamicBatcher
from app.config import Settings
from app.errors import not_ready
from app.metrics import Metrics
from app.predictor import ImagePrediction, Predictor, warmup_sizes
from model.artifact import ArtifactError, ArtifactNotFoundError

log = logging.getLogger("petvit.service")

PredictorLoader = Callable[[Settings], Predictor]


def load_from_settings(settings: Settings) -> Predictor:
    return Predictor.from_artifact(settings.checkpoint, settings.device, settings.dtype)


class ServiceLifecycle:
    """Loads the model in the background, says whether it is ready, and drains in-flight work at shutdown."""

    def __init__(self, settings: Settings, loader: PredictorLoader = load_from_settings) -> None:
        self.settings = settings
        self.loader = loader
        self.metrics = Metrics(settings.max_batch_size)
        self.predictor: Predictor | None = None
        self.batcher: DynamicBatcher | None = None
        self.preprocess_pool: ThreadPoolExecutor | None = None
        self.status = "starting"  # starting -> loading -> ready | failed; -> shutting_down
        self.message = "the service is starting"
        self.warmup_s = 0.0
        self._in_flight = 0  # /classify requests between require_ready and their answer
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def require_ready(self) -> tuple[Predictor, DynamicBatcher]:
        if self.status != "ready" or self.predictor is None or self.batcher is None:
            raise not_ready(self.message)  # /readyz asks too: refusals are counted by the route that refuses
        return self.predictor, self.batcher

    @contextlib.contextmanager
    def serving(self) -> Iterator[tuple[Predictor, DynamicBatcher]]:
        """require_ready(), then count the request as in flight until it has its answer: stop() waits for those
        before it closes the thread pool they still need (heatmap PNGs are rendered after the batch)."""
        predictor, batcher = self.require_ready()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield predictor, batcher
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def start(self) -> None:
        self.preprocess_pool = ThreadPoolExecutor(self.settings.preprocess_threads, thread_name_prefix="petvit-pre")
        path = self.settings.checkpoint
        self.status, self.message = "loading", f"loading the model from {path}"
        log.info("loading model artifact %s", path)
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        try:
            predictor = await asyncio.to_thread(self.loader, self.settings)
            sizes = warmup_sizes(self.settings.max_batch_size, self.settings.warmup, predictor.device)
            self.message = f"warming up batch sizes {sizes} on {predictor.device}"
            self.warmup_s = await asyncio.to_thread(predictor.warmup, sizes)
        except ArtifactNotFoundError as err:
            self._fail(f"{err}. The service stays up and turns ready after a restart with the artifact in place.")
            return
        except (ArtifactError, ValueError, RuntimeError, OSError) as err:  # ValueError: e.g. a missing device
            self._fail(f"could not load the model from {path}: {err}")
            return
        except Exception as err:  # anything else must not leave /readyz saying "loading" for ever
            log.exception("unexpected error while loading %s", path)
            self._fail(f"could not load the model from {path}: {type(err).__name__}: {err}")
            return
        self.predictor = predictor
        self.batcher = DynamicBatcher(
            self._run_batch,
            self.settings.max_batch_size,
            self.settings.max_wait_ms,
            self.settings.queue_limit,
            self.metrics,
            on_out_of_memory=self._free_cache,
        )
        self.batcher.start()
        meta = predictor.metadata
        self.metrics.model_info.labels(meta.get("name", "petvit"), predictor.architecture, predictor.sha256).set(1)
        if predictor.device.type == "cuda":
            self.metrics.enable_gpu_gauges()
        self.status = "ready"
        self.message = f"ready: {meta.get('name')} on {predictor.device} ({predictor.dtype})"
        log.info("%s; warm-up of %s took %.2f s", self.message, sizes, self.warmup_s)

    def _fail(self, message: str) -> None:
        self.status, self.message = "failed", message
        log.error("model not loaded: %s", message)

    def _run_batch(self, items: list[tuple]) -> list[ImagePrediction]:
        assert self.predictor is not None
        return self.predictor.predict([tensor for tensor, _ in items], [want for _, want in items])

    def _free_cache(self) -> None:
        import torch

        if self.predictor is not None and self.predictor.device.type == "cuda":
            torch.cuda.empty_cache()

    async def stop(self) -> None:
        """Stop intake and answer everything already queued before the process exits."""
        was = self.status
        self.status, self.message = "shutting_down", "the service is shutting down"
        started = time.monotonic()
        if self.batcher is not None:
            queued = self.batcher.depth
            await self.batcher.close()
            log.info("drained %d queued images in %.2f s (was %s)", queued, time.monotonic() - started, was)
        try:  # the drained requests still render their heatmaps in the pool
            await asyncio.wait_for(self._idle.wait(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d requests still unanswered at shutdown", self._in_flight)
        if self.preprocess_pool is not None:
            await asyncio.to_thread(self.preprocess_pool.shutdown, wait=True)  # joins its threads off the loop


__all__ = ["PredictorLoader", "ServiceLifecycle", "load_from_settings"]
