"""The service's lifecycle (ServiceStatus: starting -> loading -> ready | failed, then shutting_down) and its model
generations: each one a Classifier (model/inference.py) with its own batcher, which runs app/pipeline.predict_batch.
It holds the generations and nothing else: the settings it builds them from and the metrics it labels them in are
handed to it by app/service.Service, which owns those and the thread pool the requests share.

Loading happens in the background so /healthz and /readyz answer from the first second: a big model's load and
warm-up can take minutes on a GPU node, and a liveness probe must not kill the pod meanwhile.

Compiled serving (PETVIT_COMPILE, PETVIT_DTYPE=int8) is ready in seconds, full speed soon after: the eager model
(eager int8 for int8) goes live as soon as it is warm, and the compiled one is built behind it on a daemon thread
(compiling every bucket: minutes on a cold cache). Before it takes over, its forward is compared with eager float32
on a probe batch (model/compile_cache.check_agreement): a kept cache filled under other kernel settings, or a wrong
kernel, would otherwise serve wrong answers. It then goes live through the reload's swap (go_live: no request lost);
on disagreement or an exception the eager model keeps serving, with one WARNING line and
petvit_compile_checks_total{outcome} saying why. /v1/model's `serving` and petvit_compiled_serving say which serves.
Eager int8 is checked the same way before it answers anything: on disagreement float32 serves instead and nothing
is compiled (petvit_int8_checks_total{outcome}).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

import torch

from app.batcher import DynamicBatcher
from app.config import Settings
from app.errors import not_ready
from app.gpu_decode import GpuDecoder, gpu_decoder_for
from app.metrics import Metrics
from app.pipeline import ImageBatcher, predict_batch
from model.artifact import ArtifactError, ArtifactNotFoundError, load_artifact
from model.batch_sizes import warmup_sizes
from model.compile_cache import Agreement, check_agreement, probe_batch, use_compile_cache
from model.device import resolve_device
from model.inference import Classifier, prepare_for_inference

log = logging.getLogger("petvit.service")


class ServiceStatus(str, Enum):
    """starting -> loading -> ready | failed; then shutting_down. A reload keeps the service ready throughout."""

    starting = "starting"
    loading = "loading"
    ready = "ready"
    failed = "failed"
    shutting_down = "shutting_down"


class CompileState(str, Enum):
    """The compiled model built behind the eager one: "off" (neither PETVIT_COMPILE nor int8), "compiling",
    "agreed" (it serves), "disagreed" or "failed" (eager keeps serving; the log says why)."""

    off = "off"
    compiling = "compiling"
    agreed = "agreed"
    disagreed = "disagreed"
    failed = "failed"


PredictorLoader = Callable[[Settings], Classifier]
T = TypeVar("T")
# Images in the probe batch a compiled model is checked on: enough logits to tell rounding from a wrong kernel
# (off by orders of magnitude), few enough that the eager float32 reference costs a second or two on a CPU.
PROBE_IMAGES = 4


def load_from_settings(settings: Settings) -> Classifier:
    """The artifact, compiled exactly when settings.compile (int8 included: eager int8 otherwise). The lifecycle
    asks for the eager model first and the compiled one behind it."""
    return Classifier.from_artifact(
        settings.checkpoint,
        settings.device,
        settings.dtype,
        settings.compile,
        settings.max_batch_size,
        eager=not settings.compile,
    )


def agreement_with_float32(candidate: Classifier, path: Path, images: int = PROBE_IMAGES) -> Agreement:
    """`candidate`'s fast path against the artifact at `path` in eager float32, on the same device, on the probe
    batch (model/compile_cache.py)."""
    model, _ = load_artifact(path, device="cpu")
    reference = prepare_for_inference(model, "float32", candidate.device, eager=True)
    probe = probe_batch(candidate.image_size, batch=images).to(candidate.device)  # (B, 3, S, S) uint8
    return check_agreement(candidate.logits, reference, probe, candidate.dtype_name)


def _close_built(built: tuple[Classifier, float, Agreement, GpuDecoder | None]) -> None:
    built[0].close()  # a compiled model built for a generation that no longer serves (a reload overtook it)


async def in_daemon_thread(function: Callable[[], T], abandon: Callable[[T], None] | None = None) -> T:
    """Await `function()` run on a daemon thread of its own; a result nobody awaits any more (the awaiting task was
    cancelled) is handed to `abandon`. Not asyncio.to_thread: the default executor is joined when the loop closes,
    so a shutdown would wait minutes for a compile nobody needs any more."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile: nobody waits
            if error is None and abandon is not None:
                abandon(result)  # type: ignore[arg-type]  # None only alongside an error
            return
        if error is None:
            future.set_result(result)  # type: ignore[arg-type]  # None only alongside an error
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (function(), None)
        except BaseException as err:  # handed to the awaiting task, which decides
            outcome = (None, err)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown): nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="petvit-compile", daemon=True).start()
    return await future


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

    def __init__(self, settings: Settings, metrics: Metrics, loader: PredictorLoader = load_from_settings) -> None:
        self.settings = settings  # read, never owned: app/service.Service holds it
        self.metrics = metrics  # where generations are labelled (petvit_model_info, petvit_compiled_serving)
        self.loader = loader
        self.live: ModelGeneration | None = None
        self.status = ServiceStatus.starting
        self.message = "the service is starting"
        self.reloading = asyncio.Lock()  # one reload at a time (app/reload.py)
        self._retiring: set[asyncio.Task] = set()
        self.compile_state = CompileState.compiling if self.compiles else CompileState.off
        self._compiling: asyncio.Task | None = None  # the compiled model being built behind the eager one
        self._in_flight = 0  # /classify requests between require_ready and their answer
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.status is ServiceStatus.ready

    @property
    def compiles(self) -> bool:
        """Whether a compiled model is wanted: PETVIT_COMPILE, or int8 (only worth serving compiled)."""
        return self.settings.compile or self.settings.dtype == "int8"

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
        and on the service (stop() waits for those: the service closes the thread pool they still need, heatmap PNGs
        being rendered after the batch, only after it)."""
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
        if self.compiles and self.settings.compile_cache_dir is not None:
            self._open_compile_cache(self.settings.compile_cache_dir)
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

    def _open_compile_cache(self, root: Path) -> None:
        """Point inductor at root/<kernel key> before the first compile; a folder it cannot use costs a cold cache,
        never the service."""
        try:
            folder = use_compile_cache(root, resolve_device(self.settings.device))
        except (OSError, ValueError, RuntimeError) as err:  # unwritable, or a device that is not there
            log.warning("compile cache %s not used, compiling without a kept cache: %s", root, err)
        else:
            log.info("compile cache: %s", folder)

    def _settings_for(self, path: Path, compiled: bool) -> Settings:
        return self.settings.model_copy(update={"checkpoint": path, "compile": compiled})

    async def load_generation(self, path: Path) -> ModelGeneration:
        """Load and warm up the artifact at `path`, eager, off the event loop, beside whatever is serving, and open
        its batcher; raises what the loader raises (ArtifactError and its kin). The compiled model, when wanted, is
        built behind it once it serves (go_live)."""
        log.info("loading model artifact %s", path)
        predictor = await asyncio.to_thread(self.loader, self._settings_for(path, compiled=False))
        if predictor.dtype_name == "int8":
            predictor = await asyncio.to_thread(self._int8_or_float32, predictor, path)
        sizes = self._warmup_sizes(predictor)
        if self.live is None:  # the first load: /readyz shows the progress
            compiling = "compiling and " if predictor.compiled else ""
            self.message = f"{compiling}warming up batch sizes {sizes} on {predictor.device}"
        warmup_s = await asyncio.to_thread(predictor.warmup, sizes)
        decoder = await asyncio.to_thread(self._gpu_decoder_for, predictor)  # probes (and warms) the decoder
        log.info("loaded %s (%s); warm-up of %s took %.2f s", path, predictor.sha256[:12], sizes, warmup_s)
        return self._generation(predictor, decoder, path, warmup_s)

    def _int8_or_float32(self, predictor: Classifier, path: Path) -> Classifier:
        """On a worker thread: the eager int8 model checked against eager float32 on the probe batch before it ever
        answers. int8 kernels that are not faithful here (model/int8_kernels.py catches the known case; this
        catches the rest) must not serve: float32 does instead, with a WARNING and petvit_int8_checks_total."""
        agreement = agreement_with_float32(predictor, path)
        self.metrics.int8_checks.labels("agreed" if agreement.ok else "disagreed").inc()
        if agreement.ok:
            return predictor
        predictor.close()
        log.warning("serving float32 instead of int8: %s", " ".join(agreement.why().split()))
        return self.loader(self.settings.model_copy(update={"checkpoint": path, "compile": False, "dtype": "float32"}))

    def _warmup_sizes(self, predictor: Classifier) -> list[int]:
        s = self.settings
        return warmup_sizes(s.max_batch_size, s.warmup, predictor.device, predictor.buckets)

    def _generation(
        self, predictor: Classifier, decoder: GpuDecoder | None, path: Path, warmup_s: float
    ) -> ModelGeneration:
        settings = self.settings
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
        self.metrics.compiled_serving.set(1 if predictor.compiled else 0)
        self.status = ServiceStatus.ready
        compiled = ", compiled" if predictor.compiled else ""
        self.message = f"ready: {predictor.metadata.name} on {predictor.device} ({predictor.dtype_name}{compiled})"
        log.info("%s, sha256 %s", self.message, predictor.sha256)
        if self.compiles and not predictor.compiled:
            if self.settings.dtype == "int8" and predictor.dtype_name != "int8":  # _int8_or_float32 fell back:
                self.compile_state = CompileState.off  # the compiled int8 model would disagree too
                self.message += "; int8 disagreed with float32 on this machine (the log says how): serving float32"
            else:
                self._compile_behind(generation)
        return old

    # ------------------------------------------------------------------------------ the compiled model, behind
    def _compile_behind(self, eager: ModelGeneration) -> None:
        """Build the compiled model for `eager`'s artifact behind it. A newer eager generation (a reload) replaces
        the build: its thread runs on, but its result is dropped."""
        if self._compiling is not None:
            self._compiling.cancel()
        self.compile_state = CompileState.compiling
        self.message += "; compiling the faster forward behind it"
        self._compiling = asyncio.get_running_loop().create_task(self._build_compiled(eager), name="petvit-compile")

    def _compiled_and_checked(self, path: Path) -> tuple[Classifier, float, Agreement, GpuDecoder | None]:
        """On the compile thread: load the compiled model, warm (compile) every bucket, compare it with eager
        float32 on the probe batch."""
        predictor = self.loader(self._settings_for(path, compiled=True))
        warmup_s = predictor.warmup(self._warmup_sizes(predictor))
        agreement = agreement_with_float32(predictor, path)
        decoder = self._gpu_decoder_for(predictor) if agreement.ok else None
        return predictor, warmup_s, agreement, decoder

    async def _build_compiled(self, eager: ModelGeneration) -> None:
        path = eager.checkpoint
        started = time.monotonic()
        try:
            built = await in_daemon_thread(functools.partial(self._compiled_and_checked, path), _close_built)
        except Exception as err:  # a compile, or a cached kernel, that raises: never the service's end
            self._keep_eager(CompileState.failed, f"compiling {path} failed: {type(err).__name__}: {err}")
            return
        predictor, warmup_s, agreement, decoder = built
        if self.live is not eager or self.status is not ServiceStatus.ready:  # a reload or shutdown overtook it
            predictor.close()
            return
        if not agreement.ok:
            predictor.close()
            self._keep_eager(CompileState.disagreed, agreement.why())
            return
        self.metrics.compile_checks.labels(CompileState.agreed.value).inc()
        self.compile_state = CompileState.agreed
        log.info("compiled %s in %.1f s; %s", path, time.monotonic() - started, agreement.why())
        self.go_live(self._generation(predictor, decoder, path, warmup_s))

    def _keep_eager(self, outcome: CompileState, why: str) -> None:
        self.metrics.compile_checks.labels(outcome.value).inc()
        self.compile_state = outcome
        self.message = self.message.split("; ")[0] + f"; the compiled forward {outcome.value}: serving eager"
        log.warning("serving the eager model: %s", " ".join(why.split()))  # one line, whatever the exception says

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
        if self._compiling is not None:  # its thread is a daemon: the process need not wait for it
            self._compiling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compiling
        if self.live is not None:
            queued = self.live.batcher.depth
            await self.live.batcher.close()
            self.live.predictor.close()
            log.info("drained %d queued images in %.2f s (was %s)", queued, time.monotonic() - started, was)
        if self._retiring:  # generations replaced by a reload, still answering their last requests
            await asyncio.gather(*self._retiring, return_exceptions=True)
        try:  # the drained requests still render their heatmaps in the service's pool, closed after this returns
            await asyncio.wait_for(self._idle.wait(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d requests still unanswered at shutdown", self._in_flight)


__all__ = [
    "CompileState",
    "ModelGeneration",
    "PredictorLoader",
    "ServiceLifecycle",
    "ServiceStatus",
    "agreement_with_float32",
    "in_daemon_thread",
    "load_from_settings",
]
