"""What every request shares: the checked settings, the metrics, the thread pool that decodes uploads and renders
heatmaps, and the model generations (app/lifecycle.py). `create_app` builds one Service per app; handlers get it as
`ServiceDep` (app/deps.py).

Kept apart from the lifecycle so that the lifecycle holds model generations and nothing else: settings and metrics
are handed to it (it builds and labels generations with them), it owns neither, and the pool is not its business.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.config import Settings
from app.lifecycle import PredictorLoader, ServiceLifecycle, load_from_settings
from app.metrics import Metrics


@dataclass(eq=False)
class Service:
    settings: Settings
    metrics: Metrics
    models: ServiceLifecycle  # the model generations: status, the live one, reloads' swap, the compiled one behind
    pool: ThreadPoolExecutor  # CPU work beside the model: JPEG decode and resize, heatmap PNGs

    @classmethod
    def build(cls, settings: Settings, loader: PredictorLoader = load_from_settings) -> Service:
        """Cheap: the pool starts its threads on first use, the model loads in start()."""
        metrics = Metrics(settings.max_batch_size)
        pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="petvit-pre")
        return cls(settings, metrics, ServiceLifecycle(settings, metrics, loader), pool)

    async def start(self) -> None:
        """Load the model in the background of the lifespan (the lifecycle says how far it got)."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        await self.models.start()

    async def stop(self) -> None:
        """Drain the model generations, then close the pool: the drained requests still render heatmaps in it,
        and models.stop() returns once they have their answers (or their time is up)."""
        await self.models.stop()
        await asyncio.to_thread(self.pool.shutdown, wait=True)  # joins its threads off the event loop


__all__ = ["Service"]
