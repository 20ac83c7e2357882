"""Admission by deadline, the policy the batcher's queue asks before it takes a request's images: is there room in
the queue, and would they be answered before the request's deadline? With the room admitted requests hold while
their bodies are read (reservations), and the recent time per image that the estimate is made with.

The queue (app/batcher.py) feeds it the batches' timings; app/admission.py answers its refusals (429).
"""

from __future__ import annotations

import math
import time

from app.batch_errors import OverloadedError, QueueFullError

# Admit a request when its estimated wait is within this share of what is left of its deadline: the estimate is a
# recent average, and batches that run slower than it (a noisy neighbour, a cold cache) must not turn the last
# admitted requests into 504s. Goodput does not suffer: the queue still holds most of a deadline's work, far more
# than the next batch (bench/overload.py; docs/service.md has its figures).
ADMISSION_HEADROOM = 0.9


class AdmissionPolicy:
    """The estimator (EWMA of the time per image, and per batch for Retry-After) and the reservations."""

    def __init__(self, max_batch_size: int, queue_limit: int, request_timeout_s: float | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.queue_limit = queue_limit
        self.request_timeout_s = request_timeout_s  # a fresh request's whole budget: what Retry-After aims for
        self.seconds_per_batch = 0.05  # running estimate for Retry-After before the first per-image measurement
        # EWMA of (wall-clock time per batch / batch size), None until a batch has run (warm-up does not go through
        # the batcher). Under load batches are full, so this is the cost of one more image in the queue.
        self.seconds_per_image: float | None = None
        self.reserved = 0  # images of admitted requests still being read or decoded (Admission.need)

    # ------------------------------------------------------------------ reservations
    def reserve(self, images: int) -> None:
        self.reserved += images

    def release(self, images: int) -> None:
        self.reserved -= images

    # ------------------------------------------------------------------ estimates
    def retry_after_s(self, queued: int) -> int:
        """Seconds until `queued` images have drained, by the recent batch time; at least 1."""
        batches = math.ceil(queued / self.max_batch_size) + 1
        return max(1, math.ceil(batches * self.seconds_per_batch))

    def estimated_wait_s(self, queued: int, running: int, images: int, held: int = 0) -> float | None:
        """How long until `images` more would have their answers, by the recent time per image: the `running` batch
        on the model now, then the `queued` images, those reserved by admitted requests (less the `held` images of
        this one) and these; beyond one batch, in whole batches (the last image of a batch is answered with the
        first). None before the first batch has been measured."""
        if self.seconds_per_image is None:
            return None
        waiting = queued + self.reserved - held + images
        if waiting > self.max_batch_size:  # under load every batch is full by the time it is taken
            waiting = math.ceil(waiting / self.max_batch_size) * self.max_batch_size
        return (running + waiting) * self.seconds_per_image

    def check(self, queued: int, running: int, images: int, deadline: float, held: int = 0) -> None:
        """Raise QueueFullError when `images` more would take the queue past queue_limit, OverloadedError when their
        estimated wait is longer than what is left of `deadline` (a time.monotonic() value); `held`: images this
        request already holds."""
        over = queued + self.reserved - held + images - self.queue_limit
        if over > 0:
            drain = over * self.seconds_per_image if self.seconds_per_image is not None else 0.0
            raise QueueFullError(max(self.retry_after_s(queued), math.ceil(drain)))
        wait = self.estimated_wait_s(queued, running, images, held)
        left = deadline - time.monotonic()
        if wait is not None and wait > ADMISSION_HEADROOM * left:
            # A fresh request gets the whole timeout: it fits once the queue has drained by the difference.
            budget = self.request_timeout_s if self.request_timeout_s is not None else left
            raise OverloadedError(max(1, math.ceil(wait - ADMISSION_HEADROOM * budget)), wait, left)

    # ------------------------------------------------------------------ measurements
    def measure(self, images: int, seconds: float) -> None:
        """A batch of `images` took `seconds` of wall-clock time: EWMA of (its share of wall-clock time) / its size,
        so it is the rate the queue really drains at. It follows a slowdown faster than a speed-up (a neighbour
        taking the cores turns admitted requests into 504s; a recovery only costs a few early 429s)."""
        per_image = seconds / images
        last = self.seconds_per_image
        if last is None:
            self.seconds_per_image = per_image
        else:
            weight = 0.5 if per_image > last else 0.2
            self.seconds_per_image = (1 - weight) * last + weight * per_image

    def measure_batch(self, seconds: float) -> None:
        """A batch's time on the model, for Retry-After."""
        self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * seconds
