"""Zero-downtime model reload, for POST /v1/admin/reload and SIGHUP.

A path sent to POST /v1/admin/reload is resolved (symlinks, `..`) and must lie in a model folder (PETVIT_CHECKPOINT's,
or one of PETVIT_MODEL_DIRS), else 403 before anything is read from it: the admin key lets its holder change the
model, not read the server's files. The new artifact's header is then checked (missing, a pickle, truncated, not a
ViT: refused at once, in the loader's own words, which quote nothing read from a file that is not a safetensors one),
then, on CUDA, whether it fits in free memory beside the live model. It is then loaded and warmed up beside the live
model, off the event loop, with its own batcher, and swapped in with one assignment (ServiceLifecycle.go_live).
Requests admitted before the swap are answered by the old model, those after by the new one; the old batcher is
closed once its last request has its answer. A refused reload changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from app.config import Settings
from app.errors import (
    ServiceError,
    artifact_refused,
    checkpoint_not_allowed,
    insufficient_gpu_memory,
    reload_busy,
    reload_failed,
    shutting_down,
)
from app.lifecycle import ModelGeneration, ServiceStatus
from app.service import Service
from model.artifact import ArtifactError, ArtifactUnreadableError, read_metadata
from model.device import resolve_device

log = logging.getLogger("petvit.reload")


@dataclass(frozen=True)
class Reloaded:
    generation: ModelGeneration
    previous_sha256: str | None  # None when no model was serving (the first load had failed)
    seconds: float  # check + load + warm-up


def model_folders(settings: Settings) -> list[Path]:
    """The folders a reload may load from, resolved, in order: PETVIT_CHECKPOINT's, then PETVIT_MODEL_DIRS."""
    return list(dict.fromkeys(folder.resolve() for folder in (settings.checkpoint.parent, *settings.model_dirs)))


def checked_checkpoint(settings: Settings, requested: Path) -> Path:
    """`requested` resolved (symlinks followed, `..` applied; a relative path from the working directory, as
    PETVIT_CHECKPOINT is), when it is PETVIT_CHECKPOINT or lies in a model folder; else checkpoint_not_allowed
    (403). Nothing is opened, so the answer is the same whether the file exists or not. The reload then loads the
    resolved path: no link in it is followed again after the check (racing one would take write access to a model
    folder, which chooses the model anyway)."""
    folders = model_folders(settings)
    try:
        resolved = requested.resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long: no file can be there, inside a folder or out
        raise checkpoint_not_allowed(str(requested), folders) from None
    if resolved == settings.checkpoint.resolve() or any(resolved.is_relative_to(folder) for folder in folders):
        return resolved
    raise checkpoint_not_allowed(str(requested), folders)


def memory_shortfall(free_bytes: int, artifact_bytes: int, factor: float) -> str | None:
    """Why a model of `artifact_bytes` would not fit in `free_bytes` of device memory (weights plus warm-up
    activations and allocator slack: `factor` times the weights), or None when it fits."""
    needed = math.ceil(artifact_bytes * factor)
    if needed <= free_bytes:
        return None
    return (
        f"the new model needs about {needed / 2**20:.0f} MiB of GPU memory ({artifact_bytes / 2**20:.0f} MiB of "
        f"weights x {factor:g}) but only {free_bytes / 2**20:.0f} MiB are free beside the live model; "
        "restart with the new artifact instead (a rolling update), or use a smaller model"
    )


def check_fits(device: torch.device, path: Path, factor: float) -> None:
    """On CUDA, refuse (insufficient_gpu_memory) a model that would not fit beside the live one."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    # Memory PyTorch's allocator holds but no tensor uses (a retired model's, after a reload) is free for the new
    # model too, though the driver counts it as taken.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if (shortfall := memory_shortfall(free, path.stat().st_size, factor)) is not None:
        raise insufficient_gpu_memory(shortfall)


def _target_device(service: Service) -> torch.device:
    """Where the new model will live: the live model's device (the settings have not changed since)."""
    live = service.models.predictor
    return live.device if live is not None else resolve_device(service.settings.device)


def _precheck(service: Service, path: Path) -> None:
    """The cheap checks, on a worker thread: the header (ArtifactError), then the memory."""
    read_metadata(path)
    check_fits(_target_device(service), path, service.settings.reload_memory_factor)


async def reload_model(service: Service, checkpoint: Path | None = None) -> Reloaded:
    """Load `checkpoint` (default: PETVIT_CHECKPOINT) beside the live model and swap it in; a ServiceError says
    why not (403 outside the model folders, 409 while another reload or the first load runs, 422 for an artifact we
    will not serve, ...)."""
    models = service.models
    try:
        path = service.settings.checkpoint if checkpoint is None else checked_checkpoint(service.settings, checkpoint)
        if models.reloading.locked() or models.status in (ServiceStatus.starting, ServiceStatus.loading):
            raise reload_busy("another reload is running" if models.reloading.locked() else "the model is loading")
        if models.status is ServiceStatus.shutting_down:
            raise shutting_down()
        async with models.reloading:
            reloaded = await _load_and_swap(service, path)
    except ServiceError as err:
        service.metrics.reloads.labels(err.kind.reload_outcome).inc()
        log.warning("reload refused: %s", err.message)
        raise
    service.metrics.reloads.labels("success").inc()
    return reloaded


async def _load_and_swap(service: Service, path: Path) -> Reloaded:
    started, models = time.monotonic(), service.models
    previous = models.predictor.sha256 if models.predictor is not None else None
    log.info("reloading the model from %s", path)
    try:
        await asyncio.to_thread(_precheck, service, path)
        generation = await models.load_generation(path)
    except (ArtifactUnreadableError, OSError) as err:  # which of the three: the DEBUG log, never the answer
        log.debug("reload from %s: %s", path, err)
        raise artifact_refused(
            f"cannot load {path}: no file this service can read is there (missing, a folder, or not readable by its "
            "user)"
        ) from None
    except (ArtifactError, ValueError) as err:  # ValueError: the metadata or the weights do not add up
        raise artifact_refused(str(err)) from None
    except ServiceError:
        raise
    except Exception as err:  # e.g. out of memory during warm-up: the old model still serves
        log.exception("reload from %s failed", path)
        raise reload_failed(f"{type(err).__name__}: {err}") from None
    if models.status is ServiceStatus.shutting_down:  # stopped while we loaded: never open a batcher nobody will close
        raise shutting_down()
    models.go_live(generation)
    return Reloaded(generation, previous, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------------- SIGHUP
_background: set[asyncio.Task] = set()


def reload_in_background(service: Service) -> asyncio.Task:
    """Reload PETVIT_CHECKPOINT as a task of its own (what SIGHUP does); a refusal is logged, never raised."""

    async def reload_and_log() -> None:
        try:
            reloaded = await reload_model(service)
        except ServiceError:
            return  # reload_model logged why; the old model keeps serving
        log.info("SIGHUP reload: now serving %s", reloaded.generation.predictor.sha256)

    task = asyncio.get_running_loop().create_task(reload_and_log(), name="petvit-sighup-reload")
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def install_sighup_handler(service: Service) -> Callable[[], None]:
    """Make SIGHUP reload PETVIT_CHECKPOINT (its default action would end the process); returns the function that
    puts the previous handler back, for the lifespan's shutdown. uvicorn handles only SIGINT and SIGTERM, through
    signal.signal too, so the two never meet. Signals can only be caught on the main thread: elsewhere (an app run
    in a thread) this does nothing."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()

    def on_sighup(signum: int, frame: object) -> None:  # runs between bytecodes of the main thread
        loop.call_soon_threadsafe(reload_in_background, service)

    previous = signal.signal(signal.SIGHUP, on_sighup)

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)

    return restore
