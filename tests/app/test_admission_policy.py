"""app/admission_policy.py on its own: the estimate, the refusals and the reservations, without a queue or a model."""

from __future__ import annotations

import time

import pytest

from app.admission_policy import ADMISSION_HEADROOM, AdmissionPolicy
from app.batch_errors import OverloadedError, QueueFullError


def test_no_estimate_before_the_first_batch_then_whole_batches_past_one() -> None:
    policy = AdmissionPolicy(max_batch_size=4, queue_limit=100)
    assert policy.estimated_wait_s(queued=10, running=4, images=1) is None
    policy.measure(images=4, seconds=2.0)  # 0.5 s an image
    assert policy.estimated_wait_s(queued=2, running=0, images=1) == pytest.approx(1.5)  # within one batch
    # 4 running + (10 queued + 1 -> 3 whole batches of 4 = 12) = 16 images x 0.5 s
    assert policy.estimated_wait_s(queued=10, running=4, images=1) == pytest.approx(8.0)


def test_the_estimate_follows_a_slowdown_faster_than_a_recovery() -> None:
    policy = AdmissionPolicy(max_batch_size=1, queue_limit=10)
    policy.measure(1, 1.0)
    policy.measure(1, 3.0)
    assert policy.seconds_per_image == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)
    policy.measure(1, 1.0)
    assert policy.seconds_per_image == pytest.approx(0.8 * 2.0 + 0.2 * 1.0)


def test_reservations_count_against_the_queue_limit_until_released() -> None:
    policy = AdmissionPolicy(max_batch_size=4, queue_limit=3)
    policy.reserve(2)
    policy.check(queued=0, running=0, images=1, deadline=time.monotonic() + 30)  # 2 held + 1 = 3: fits
    with pytest.raises(QueueFullError):
        policy.check(queued=1, running=0, images=1, deadline=time.monotonic() + 30)
    policy.check(queued=1, running=0, images=1, deadline=time.monotonic() + 30, held=2)  # its own room is no rival
    policy.release(2)
    assert policy.reserved == 0


def test_a_wait_past_the_headroom_of_the_deadline_is_overloaded_with_a_retry_after() -> None:
    policy = AdmissionPolicy(max_batch_size=4, queue_limit=100, request_timeout_s=10.0)
    policy.measure(4, 4.0)  # 1 s an image
    policy.check(queued=3, running=0, images=1, deadline=time.monotonic() + 10.0)  # 4 images: 4 s of the 9 allowed
    with pytest.raises(OverloadedError) as refused:
        policy.check(queued=8, running=0, images=1, deadline=time.monotonic() + 10.0)  # 9 -> 3 batches: 12 s
    assert refused.value.estimated_s == pytest.approx(12.0)
    # A fresh request gets the whole 10 s: it fits once the queue has drained by 12 - 0.9 x 10 = 3 s.
    assert refused.value.retry_after_s == 3 and ADMISSION_HEADROOM == 0.9
