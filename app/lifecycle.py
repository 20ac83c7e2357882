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
from dataclasses import dataclass
from typing import cast

import torch

from app.batcher import DynamicBatcher
from app.config import Settings
from app.errors import ServiceError, not_ready
from app.gpu_decode import GpuDecoder, Pixels, gpu_decoder_for
from app.metrics import Metrics
from app.predictor import ImagePrediction, Predictor, warmup_sizes
from model.artifact import ArtifactError, ArtifactNotFoundError
from model.explain import DEFAULT_METHOD

log = logging.getLogger("petvit.service")

PredictorLoader = Callable[[Settings], Predictor]


def load_from_settings(settings: Settings) -> Predictor:
    return Predictor.from_artifact(
        settings.checkpoint, settings.device, settings.dtype, settings.compile, settings.max_batch_size
    )


@dataclass(frozen=True)
class ImageJob:
    """One image for the model: what the service's batcher queues and its inference thread hands the predictor."""

    pixels: Pixels  # (3, S, S) uint8 as app.preprocess.prepare makes it, or a JPEG left for the model's device
    heatmap: bool  # run it on the explicit-attention path and return its heatmap grid
    heatmap_method: str = DEFAULT_METHOD  # which heatmap: a key of model.explain.SERVICE_METHODS


# One image's result from its batch: the prediction, or the ServiceError (a 400 for a JPEG that turned out corrupt
# when the inference thread decoded it) that answers its own request. An error travels as a result, not as an
# exception, because the batcher fails every item of a batch on an exception: the other requests sharing the forward
# pass must still get their answers.
ImageOutcome = ImagePrediction | ServiceError
ImageBatcher = DynamicBatcher[ImageJob, ImageOutcome]


class ServiceLifecycle:
    """Loads the model in the background, says whether it is ready, and drains in-flight work at shutdown."""

    def __init__(self, settings: Settings, loader: PredictorLoader = load_from_settings) -> None:
        self.settings = settings
        self.loader = loader
        self.metrics = Metrics(settings.max_batch_size)
        self.predictor: Predictor | None = None
        self.gpu_decoder: GpuDecoder | None = None  # set when JPEG uploads decode on the model's device
        self.batcher: ImageBatcher | None = None
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

    def require_ready(self) -> tuple[Predictor, ImageBatcher]:
        if self.status != "ready" or self.predictor is None or self.batcher is None:
            raise not_ready(self.message)  # /readyz asks too: refusals are counted by the route that refuses
        return self.predictor, self.batcher

    @contextlib.contextmanager
    def serving(self) -> Iterator[tuple[Predictor, ImageBatcher]]:
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
        """Load and warm up the model off the event loop, then open the batcher. A model that cannot be loaded
        leaves the service up but not ready, with /readyz saying why."""
        self.preprocess_pool = ThreadPoolExecutor(self.settings.preprocess_threads, thread_name_prefix="petvit-pre")
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if (loaded := await self._load_and_warm_up()) is not None:
            self._open(*loaded)

    async def _load_and_warm_up(self) -> tuple[Predictor, list[int], GpuDecoder | None] | None:
        """The predictor, the batch sizes it was warmed with and the JPEG decoder on its device (None: the CPU pool
        decodes); None (and status "failed") when it won't load."""
        path = self.settings.checkpoint
        self.status, self.message = "loading", f"loading the model from {path}"
        log.info("loading model artifact %s", path)
        try:
            predictor = await asyncio.to_thread(self.loader, self.settings)
            settings = self.settings
            sizes = warmup_sizes(settings.max_batch_size, settings.warmup, predictor.device, predictor.buckets)
            compiling = "compiling and " if predictor.compiled else ""
            self.message = f"{compiling}warming up batch sizes {sizes} on {predictor.device}"
            self.warmup_s = await asyncio.to_thread(predictor.warmup, sizes)
            decoder = await asyncio.to_thread(self._gpu_decoder_for, predictor)  # probes (and warms) the decoder
        except ArtifactNotFoundError as err:
            self._fail(f"{err}. The service stays up and turns ready after a restart with the artifact in place.")
            return None
        except (ArtifactError, ValueError, RuntimeError, OSError) as err:  # ValueError: e.g. a missing device
            self._fail(f"could not load the model from {path}: {err}")
            return None
        except Exception as err:  # anything else must not leave /readyz saying "loading" for ever
            log.exception("unexpected error while loading %s", path)
            self._fail(f"could not load the model from {path}: {type(err).__name__}: {err}")
            return None
        return predictor, sizes, decoder

    def _gpu_decoder_for(self, predictor: Predictor) -> GpuDecoder | None:
        s = self.settings
        return gpu_decoder_for(s.gpu_decode, predictor.device, predictor.preprocessing, s.max_pixels, self.metrics)

    def _open(self, predictor: Predictor, warmed_sizes: list[int], decoder: GpuDecoder | None) -> None:
        """Serve with this predictor: its batcher, its metrics, then ready."""
        self.predictor = predictor
        self.gpu_decoder = decoder
        self.batcher = DynamicBatcher(
            self._predict,
            self.settings.max_batch_size,
            self.settings.max_wait_ms,
            self.settings.queue_limit,
            self.metrics,
            on_out_of_memory=self._free_cache,
        )
        self.batcher.start()
        meta = predictor.metadata
        self.metrics.model_info.labels(meta.name, predictor.architecture, predictor.sha256, predictor.dtype_name).set(1)
        if predictor.device.type == "cuda":
            self.metrics.enable_gpu_gauges()
        if decoder is not None:
            self.metrics.enable_gpu_decode_counter()
        self.status = "ready"
        compiled = ", compiled" if predictor.compiled else ""
        self.message = f"ready: {meta.name} on {predictor.device} ({predictor.dtype_name}{compiled})"
        log.info("%s; warm-up of %s took %.2f s", self.message, warmed_sizes, self.warmup_s)

    def _fail(self, message: str) -> None:
        self.status, self.message = "failed", message
        log.error("model not loaded: %s", message)

    def _predict(self, jobs: list[ImageJob]) -> list[ImageOutcome]:
        """One batch, on the batcher's inference thread. Deferred JPEGs are decoded here, together, right before the
        forward pass; an image that cannot be decoded is its own outcome and the rest of the batch runs without it."""
        assert self.predictor is not None
        pixels = [job.pixels for job in jobs]  # DeferredJpegs only when a decoder is set: the route defers for it
        images = self.gpu_decoder.materialize(pixels) if self.gpu_decoder else [cast(torch.Tensor, p) for p in pixels]
        ready = [(im, job) for im, job in zip(images, jobs, strict=True) if isinstance(im, torch.Tensor)]
        heatmaps, methods = [job.heatmap for _, job in ready], [job.heatmap_method for _, job in ready]
        predictions = iter(self.predictor.predict([image for image, _ in ready], heatmaps, methods))
        return [next(predictions) if isinstance(image, torch.Tensor) else image for image in images]

    def _free_cache(self) -> None:
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


__all__ = ["ImageBatcher", "ImageJob", "ImageOutcome", "PredictorLoader", "ServiceLifecycle", "load_from_settings"]
