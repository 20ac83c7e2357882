"""DynamicBatcher: many concurrent requests -> few forward passes (after Ray Serve's @serve.batch and LitServe).

A caller makes one call, `results = await batcher.run(items, deadline)`, and gets its results in order or a typed
error (BatcherError); the batcher owns the waiting, the deadline and the cancelling of what the caller no longer
needs. Inside: one bounded queue of (item, future); one worker task waits for the first item, then collects until
the batch is full or max_wait_ms has passed since that first item, and runs the batch on one dedicated thread so
the event loop keeps accepting requests. While a batch runs, the next one accumulates, so under load batches fill up
by themselves and max_wait_ms only matters when the service is quiet.

The batcher is the queue; whether a request is let in (queue room, its deadline, the room admitted requests hold) is
its AdmissionPolicy's call (app/admission_policy.py), which the worker feeds with each batch's timing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app.admission_policy import AdmissionPolicy
from app.batch_errors import (
    BatcherClosedError,
    DeadlineExceededError,
    InferenceFailedError,
)
from app.metrics import Metrics

log = logging.getLogger("petvit.batcher")

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchResult(Generic[R]):
    """One item's result, with what the caller reports about how it was computed."""

    value: R
    queue_wait_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float
    deadline: float
    started: float = 0.0  # when its batch was formed: queue wait = started - enqueued
    cancelled_by_caller: bool = False  # run() was cancelled (a client that disconnected): counted when dropped


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA (or MPS) ran out of memory for this batch; a smaller batch may still fit."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        queue_limit: int = 256,
        metrics: Metrics | None = None,
        on_out_of_memory: Callable[[], None] | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_limit < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and queue_limit must be >= 1 and max_wait_ms >= 0")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.queue_limit = queue_limit
        self.metrics = metrics
        self.on_out_of_memory = on_out_of_memory  # e.g. torch.cuda.empty_cache before retrying smaller halves
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None
        # One thread: the model runs one batch at a time; a second thread would only contend for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="petvit-inference")
        # Whether one more request fits (queue room, its deadline), and the room admitted requests hold: a policy of
        # its own, fed the batches' timings by the worker.
        self.policy = AdmissionPolicy(max_batch_size, queue_limit, request_timeout_s)
        self._running = 0  # images in the batch on the inference thread now
        self._last_end = 0.0  # when the last batch's results were handed back (time.monotonic())
        self._backlog = False  # whether images were waiting then: the next batch starts where that one ended

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="petvit-batcher")

    async def close(self) -> None:
        """Stop intake, finish everything already queued, then stop the worker and its thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ intake
    def retry_after_s(self) -> int:
        """Seconds until the queue has drained, by the recent batch time; at least 1."""
        return self.policy.retry_after_s(len(self._queue))

    def estimated_wait_s(self, images: int, held: int = 0) -> float | None:
        """How long until `images` more would have their answers (AdmissionPolicy.estimated_wait_s)."""
        return self.policy.estimated_wait_s(len(self._queue), self._running, images, held)

    def admit(self, deadline: float) -> Admission:
        """Room in the queue for a request, held from before its body is read until submit() queues its images;
        `with batcher.admit(deadline) as admission: admission.need(n)` (see Admission)."""
        return Admission(self, deadline)

    def check(self, images: int, deadline: float, held: int = 0) -> None:
        """Raise QueueFullError when `images` more would take the queue past queue_limit, OverloadedError when their
        estimated wait is longer than what is left of `deadline`; `held`: images this request already holds."""
        if self._closing:
            raise BatcherClosedError("the service is shutting down")
        self.policy.check(len(self._queue), self._running, images, deadline, held)

    async def run(
        self, items: Sequence[T], deadline: float, admission: Admission | None = None
    ) -> list[BatchResult[R]]:
        """Each item's result, in order, once its batch has run: what a caller awaits (Ray Serve's `await f(x)`).

        deadline is a time.monotonic() value. Raises QueueFullError (OverloadedError) or BatcherClosedError before
        anything is queued, DeadlineExceededError once the deadline passes, InferenceFailedError when a batch
        holding one of the items failed. Whenever the call ends early (one of those, or the caller itself
        cancelled: a client that disconnected) its items still queued are cancelled, so the worker skips them.
        """
        pending = self._submit(items, deadline, admission)
        futures = [p.future for p in pending]
        gathered = asyncio.gather(*futures)
        gathered.add_done_callback(_retrieve)  # cancelled items end it with an exception nobody else reads
        try:
            return await asyncio.wait_for(gathered, max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineExceededError):
            raise DeadlineExceededError() from None
        except asyncio.CancelledError:
            for p in pending:
                p.cancelled_by_caller = True
            raise
        except Exception as error:  # the model's own exception, from _run_batch
            raise InferenceFailedError(error) from error
        finally:
            for future in futures:
                future.cancel()  # no-op once settled; a queued item is dropped when the worker reaches it

    def submit(self, items: Sequence[T], deadline: float, admission: Admission | None = None) -> list[asyncio.Future]:
        """Queue all of a request's items or none (a half-queued request would waste model time on a 429).

        run()'s first step, public for callers that want one future per item (each resolves to a BatchResult);
        such a caller owns the waiting and must cancel the futures it stops waiting for.
        """
        return [p.future for p in self._submit(items, deadline, admission)]

    def _submit(self, items: Sequence[T], deadline: float, admission: Admission | None) -> list[_Pending]:
        held = admission.images if admission is not None else 0
        self.check(len(items), deadline, held)
        if admission is not None:
            admission.release()  # its room becomes these queued items, in the same step: nobody can take it
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = [_Pending(item, loop.create_future(), now, deadline) for item in items]
        self._queue.extend(pending)
        self._set_depth()
        self._wakeup.set()
        return pending

    # ------------------------------------------------------------------ worker
    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))

    async def _wait_for_batch(self) -> str:
        """Wait until the queue holds a full batch, the first item has waited max_wait, or shutdown; say which."""
        while len(self._queue) < self.max_batch_size:
            if self._closing:
                return "shutdown"
            remaining = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return "timeout"
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return "timeout"
        return "full"

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while await self._has_work():
            reason = await self._wait_for_batch()
            # A batch taken from a backlog left by the previous one costs the whole gap since that one ended (event
            # loop, GIL, the worker's own steps), not only its time on the inference thread.
            started = self._last_end if self._backlog else time.monotonic()
            live = self._take_batch()
            if not live:
                self._last_end, self._backlog = time.monotonic(), bool(self._queue)
                continue  # nothing left for the model: not a released batch
            if self.metrics:
                self.metrics.batch_flush.labels(reason).inc()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, live)
            except Exception:  # _run_batch settles every future itself; this is only a safety net
                log.exception("batch runner failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError("inference failed"))
            finally:
                self._running = 0
                self._last_end, self._backlog = time.monotonic(), bool(self._queue)
                self.policy.measure(len(live), self._last_end - started)

    async def _has_work(self) -> bool:
        """Wait until something is queued; False once shutdown has begun and the queue is empty."""
        while not self._queue:
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        return True

    def _take_batch(self) -> list[_Pending]:
        """Pop the next batch and keep the items still worth running: an abandoned one (its caller cancelled: a
        client that disconnected; or gave up) is dropped, an expired one failed, and so is one whose deadline would
        pass before this batch is done by the recent time per image; none of them reaches the model."""
        batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        self._set_depth()
        now = time.monotonic()
        alive = sum(not p.future.done() for p in batch)
        finish = now + alive * (self.policy.seconds_per_image or 0.0)  # when this batch will be done, by the estimate
        live = []
        for p in batch:
            if p.future.done():  # the caller gave up (deadline, disconnect, a failed sibling) while it waited
                self._count_drop("cancelled" if p.cancelled_by_caller else "abandoned")
                continue
            if finish >= p.deadline:
                p.future.set_exception(DeadlineExceededError())  # the caller counts its refusal, once
                self._count_drop("expired")
                continue
            p.started = now
            live.append(p)
        self._running = len(live)
        return live

    def _count_drop(self, reason: str) -> None:
        if self.metrics:
            self.metrics.dropped_images.labels(reason).inc()

    def _run_batch(self, batch: list[_Pending]) -> None:
        """Runs on the inference thread: process, then settle each future on the event loop."""
        start = time.perf_counter()
        try:
            results = list(self.process([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)}")
        except Exception as error:
            if is_out_of_memory(error) and len(batch) > 1:
                # Halve and retry: the batch fit in the warm-up, so fragmentation or a co-tenant took memory.
                log.warning("out of memory on a batch of %d; retrying as two halves", len(batch))
                if self.on_out_of_memory:
                    self.on_out_of_memory()
                half = len(batch) // 2
                self._run_batch(batch[:half])
                self._run_batch(batch[half:])
                return
            log.exception("a batch of %d failed; failing its items only", len(batch))
            for p in batch:
                self._settle(p, error=error)
            return
        elapsed = time.perf_counter() - start
        self.policy.measure_batch(elapsed)
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.inference_duration.observe(elapsed)
        for p, value in zip(batch, results, strict=True):
            if self.metrics:
                self.metrics.queue_wait.observe(p.started - p.enqueued)
            self._settle(p, BatchResult(value, p.started - p.enqueued, elapsed, len(batch)))

    def _settle(self, p: _Pending, result: BatchResult | None = None, error: BaseException | None = None) -> None:
        def apply() -> None:
            if p.future.done():
                return
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(result)

        p.future.get_loop().call_soon_threadsafe(apply)


class Admission:
    """Queue room held for one request between admission and queuing, so that a request admitted before its body
    was read and decoded still finds room after: a burst of requests all see the room the ones before them took.

    need(n) is called with 1 before the body is read (the least any request brings), then with each new count as
    multipart images start arriving; each call checks only the images not yet held (QueueFullError /
    OverloadedError) and holds them. submit() turns the held room into queued items; leaving the `with` block
    releases whatever is still held (a refused or failed request)."""

    def __init__(self, batcher: DynamicBatcher, deadline: float) -> None:
        self.batcher = batcher
        self.deadline = deadline
        self.images = 0

    def need(self, images: int) -> None:
        extra = images - self.images
        if extra <= 0:
            return
        self.batcher.check(extra, self.deadline, held=0)
        self.batcher.policy.reserve(extra)
        self.images = images

    def release(self) -> None:
        self.batcher.policy.release(self.images)
        self.images = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
