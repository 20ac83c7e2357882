"""The service's lifecycle (ServiceStatus: starting -> loading -> ready | failed, then shutting_down) and its model
generations: each one a Classifier (model/inference.py) with its own batcher, which runs app/pipeline.predict_batch.
It also still holds the settings, the metrics and the preprocessing thread pool the requests share.

Loading happens in the background so /healthz and /readyz answer from the first second: a big model's load and
warm-up can take minutes on a GPU node, and a liveness probe must not kill the pod meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from app.batcher import DynamicBatcher
from app.config import Settings
from app.errors import not_ready
from app.gpu_decode import GpuDecoder, gpu_decoder_for
from app.metrics import Metrics
from app.pipeline import ImageBatcher, predict_batch
from model.artifact import ArtifactError, ArtifactNotFoundError
from model.batch_sizes import warmup_sizes
from model.inference import Classifier

log = logging.getLogger("petvit.service")


class ServiceStatus(str, Enum):
    """starting -> loading -> ready | failed; then shutting_down. A reload keeps the service ready throughout."""

    starting = "starting"
    loading = "loading"
    ready = "ready"
    failed = "failed"
    shutting_down = "shutting_down"


PredictorLoader = Callable[[Settings], Classifier]


def load_from_settings(settings: Settings) -> Classifier:
    return Classifier.from_artifact(
        settings.checkpoint, settings.device, settings.dtype, settings.compile, settings.max_batch_size
    )


@dataclass(eq=False)
class ModelGeneration:
    """One loaded model and its own batcher. A request is pinned to the generation that is live when it is
    admitted and answered by it from start to end, even if a reload swaps in another one meanwhile; a replaced
    generation is retired (its batcher closed) once its last request has its answer."""

    predictor: Classifier
    batcher: ImageBatcher
    gpu_decoder: GpuDecoder | None  # set when JPEG uploads decode on the model's device
    checkpoint: Path
    warmup_s: float
    in_flight: int = 0  # requests pinned to it between serving() and their answer
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model_info_labels(self) -> tuple[str, str, str, str]:
        p = self.predictor
        return p.metadata.name, p.architecture, p.sha256, p.dtype_name


class ServiceLifecycle:
    """Loads the model in the background, says whether it is ready, swaps in a new model on reload, and drains
    in-flight work at shutdown."""

    def __init__(self, settings: Settings, loader: PredictorLoader = load_from_settings) -> None:
        self.settings = settings
        self.loader = loader
        self.metrics = Metrics(settings.max_batch_size)
        self.live: ModelGeneration | None = None
        self.preprocess_pool: ThreadPoolExecutor | None = None
        self.status = ServiceStatus.starting
        self.message = "the service is starting"
        self.reloading = asyncio.Lock()  # one reload at a time (app/reload.py)
        self._retiring: set[asyncio.Task] = set()
        self._in_flight = 0  # /classify requests between require_ready and their answer
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.status is ServiceStatus.ready

    @property
    def predictor(self) -> Classifier | None:
        return self.live.predictor if self.live else None

    @property
    def batcher(self) -> ImageBatcher | None:
        return self.live.batcher if self.live else None

    @property
    def gpu_decoder(self) -> GpuDecoder | None:
        return self.live.gpu_decoder if self.live else None

    @property
    def warmup_s(self) -> float:
        return self.live.warmup_s if self.live else 0.0

    def require_ready(self) -> tuple[Classifier, ImageBatcher]:
        generation = self._require_live()
        return generation.predictor, generation.batcher

    def _require_live(self) -> ModelGeneration:
        if not self.ready or self.live is None:
            raise not_ready(self.message)  # /readyz asks too: refusals are counted by the route that refuses
        return self.live

    @contextlib.contextmanager
    def serving(self) -> Iterator[ModelGeneration]:
        """The live generation, pinned: the request is counted as in flight on it (a reload retires it only after)
        and on the service (stop() waits for those before it closes the thread pool they still need: heatmap PNGs
        are rendered after the batch)."""
        generation = self._require_live()
        generation.in_flight += 1
        generation.idle.clear()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield generation
        finally:
            generation.in_flight -= 1
            if not generation.in_flight:
                generation.idle.set()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def start(self) -> None:
        """Load and warm up the model off the event loop, then open the batcher. A model that cannot be loaded
        leaves the service up but not ready, with /readyz saying why."""
        self.preprocess_pool = ThreadPoolExecutor(self.settings.preprocess_threads, thread_name_prefix="petvit-pre")
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        path = self.settings.checkpoint
        self.status, self.message = ServiceStatus.loading, f"loading the model from {path}"
        try:
            generation = await self.load_generation(path)
        except ArtifactNotFoundError as err:
            self._fail(f"{err}. The service stays up and turns ready after a restart with the artifact in place.")
        except (ArtifactError, ValueError, RuntimeError, OSError) as err:  # ValueError: e.g. a missing device
            self._fail(f"could not load the model from {path}: {err}")
        except Exception as err:  # anything else must not leave /readyz saying "loading" for ever
            log.exception("unexpected error while loading %s", path)
            self._fail(f"could not load the model from {path}: {type(err).__name__}: {err}")
        else:
            self.go_live(generation)

    async def load_generation(self, path: Path) -> ModelGeneration:
        """Load and warm up the artifact at `path` off the event loop, beside whatever is serving, and open its
        batcher; raises what the loader raises (ArtifactError and its kin)."""
        log.info("loading model artifact %s", path)
        predictor = await asyncio.to_thread(self.loader, self.settings.model_copy(update={"checkpoint": path}))
        settings = self.settings
        sizes = warmup_sizes(settings.max_batch_size, settings.warmup, predictor.device, predictor.buckets)
        if self.live is None:  # the first load: /readyz shows the progress
            compiling = "compiling and " if predictor.compiled else ""
            self.message = f"{compiling}warming up batch sizes {sizes} on {predictor.device}"
        warmup_s = await asyncio.to_thread(predictor.warmup, sizes)
        decoder = await asyncio.to_thread(self._gpu_decoder_for, predictor)  # probes (and warms) the decoder
        log.info("loaded %s (%s); warm-up of %s took %.2f s", path, predictor.sha256[:12], sizes, warmup_s)
        batcher = DynamicBatcher(
            functools.partial(predict_batch, predictor, decoder),
            settings.max_batch_size,
            settings.max_wait_ms,
            settings.queue_limit,
            self.metrics,
            on_out_of_memory=functools.partial(self._free_cache, predictor),
            request_timeout_s=settings.request_timeout_s,
        )
        return ModelGeneration(predictor, batcher, decoder, path, warmup_s)

    def _gpu_decoder_for(self, predictor: Classifier) -> GpuDecoder | None:
        s = self.settings
        return gpu_decoder_for(s.gpu_decode, predictor.device, predictor.preprocessing, s.max_pixels, self.metrics)

    def go_live(self, generation: ModelGeneration) -> ModelGeneration | None:
        """Serve with this generation from the next request on (one assignment on the event loop: atomic), its
        labels in petvit_model_info instead of the old one's; the old generation is retired once its requests
        have their answers. Returns the generation it replaced."""
        generation.batcher.start()
        old, self.live = self.live, generation
        if old is not None:
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(*old.model_info_labels)
            self._retire(old)
        self.metrics.model_info.labels(*generation.model_info_labels).set(1)
        predictor = generation.predictor
        if predictor.device.type == "cuda" and self.metrics.gpu_allocated is None:
            self.metrics.enable_gpu_gauges()
        if generation.gpu_decoder is not None and self.metrics.gpu_decode is None:
            self.metrics.enable_gpu_decode_counter()
        self.status = ServiceStatus.ready
        compiled = ", compiled" if predictor.compiled else ""
        self.message = f"ready: {predictor.metadata.name} on {predictor.device} ({predictor.dtype_name}{compiled})"
        log.info("%s, sha256 %s", self.message, predictor.sha256)
        return old

    def _retire(self, old: ModelGeneration) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(old), name="petvit-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, old: ModelGeneration) -> None:
        """Close a replaced generation's batcher once no request is pinned to it (every one of them has submitted
        and been answered, or gave up), then let go of its model."""
        if old.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(old.idle.wait(), self.settings.request_timeout_s + 5)
        await old.batcher.close()
        old.predictor.close()  # its CUDA-graph thread, when compiled on CUDA: one per reload otherwise
        log.info("retired model %s (%s)", old.checkpoint, old.predictor.sha256[:12])

    def _fail(self, message: str) -> None:
        self.status, self.message = ServiceStatus.failed, message
        log.error("model not loaded: %s", message)

    @staticmethod
    def _free_cache(predictor: Classifier) -> None:
        if predictor.device.type == "cuda":
            torch.cuda.empty_cache()

    async def stop(self) -> None:
        """Stop intake and answer everything already queued before the process exits."""
        was = self.status
        self.status, self.message = ServiceStatus.shutting_down, "the service is shutting down"
        started = time.monotonic()
        if self.live is not None:
            queued = self.live.batcher.depth
            await self.live.batcher.close()
            self.live.predictor.close()
            log.info("drained %d queued images in %.2f s (was %s)", queued, time.monotonic() - started, was)
        if self._retiring:  # generations replaced by a reload, still answering their last requests
            await asyncio.gather(*self._retiring, return_exceptions=True)
        try:  # the drained requests still render their heatmaps in the pool
            await asyncio.wait_for(self._idle.wait(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d requests still unanswered at shutdown", self._in_flight)
        if self.preprocess_pool is not None:
            await asyncio.to_thread(self.preprocess_pool.shutdown, wait=True)  # joins its threads off the loop


__all__ = [
    "ModelGeneration",
    "PredictorLoader",
    "ServiceLifecycle",
    "ServiceStatus",
    "load_from_settings",
]
