"""DynamicBatcher through the app (ASGITransport + LifespanManager + asyncio.gather) and on its own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from PIL import Image

from app.batch_errors import BatcherClosedError, DeadlineExceededError, InferenceFailedError, QueueFullError
from app.batcher import DynamicBatcher
from app.metrics import Metrics

from .fixtures import (
    assert_matches_model,
    direct_probs,
    encode,
    flushes,
    make_settings,
    png_bytes,
    recording_loader,
    rejected,
    running_app,
    until,
)


def post_png(client, data: bytes, **params):
    return client.post("/classify", content=data, headers={"Content-Type": "image/png"}, params=params)


async def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_answer(tiny_artifact):
    settings = make_settings(tiny_artifact, max_batch_size=8, max_wait_ms=100)
    async with running_app(settings, recording_loader(tiny_artifact)) as (client, service):
        images = [png_bytes(seed) for seed in range(12)]
        responses = await asyncio.gather(*(post_png(client, data) for data in images))
        batches = service.models.predictor.batches
    assert [r.status_code for r in responses] == [200] * 12
    assert len(batches) < 12 and sum(len(b) for b in batches) == 12
    assert max(len(b) for b in batches) > 1
    for response, data in zip(responses, images, strict=True):
        assert_matches_model(response.json()["results"][0], direct_probs(tiny_artifact, data), 5)


async def test_batch_is_released_when_full_without_waiting(tiny_artifact):
    settings = make_settings(tiny_artifact, max_batch_size=4, max_wait_ms=10_000)
    async with running_app(settings, recording_loader(tiny_artifact)) as (client, service):
        start = time.monotonic()
        files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(8)]
        response = await asyncio.wait_for(client.post("/classify", files=files), 5)
        elapsed = time.monotonic() - start
        assert response.status_code == 200
        assert [len(b) for b in service.models.predictor.batches] == [4, 4]
        assert flushes(service, "full") == 2 and flushes(service, "timeout") == 0
    assert elapsed < 5


async def test_partial_batch_is_released_after_max_wait(tiny_artifact):
    settings = make_settings(tiny_artifact, max_batch_size=64, max_wait_ms=150)
    async with running_app(settings, recording_loader(tiny_artifact)) as (client, service):
        start = time.monotonic()
        responses = await asyncio.gather(*(post_png(client, png_bytes(i)) for i in range(3)))
        elapsed = time.monotonic() - start
        assert [r.status_code for r in responses] == [200] * 3
        assert [len(b) for b in service.models.predictor.batches] == [3]
        assert flushes(service, "timeout") == 1 and flushes(service, "full") == 0
        # The first image queued waits out max_wait; the others joined it later (their uploads are prepared in a
        # thread pool, milliseconds apart on a quiet machine, tens of ms on a busy one) and wait less.
        waits = [r.json()["results"][0]["timings"]["queue_ms"] for r in responses]
        assert max(waits) >= 140 and max(waits) - min(waits) < 140, waits
    assert elapsed >= 0.15


async def test_full_queue_answers_429_with_retry_after(tiny_artifact):
    settings = make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0, queue_limit=2, max_files=2)
    async with running_app(settings, recording_loader(tiny_artifact, delay_s=0.2)) as (client, service):
        responses = await asyncio.gather(*(post_png(client, png_bytes(i)) for i in range(8)))
        queue_full = rejected(service, "queue_full")
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes and set(codes) == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
    assert queue_full == codes.count(429)


async def test_deadline_answers_504_and_expired_items_never_reach_the_model(tiny_artifact):
    # The first image must reach the model within its 0.25 s (preprocessing a 64x48 PNG takes milliseconds, but
    # leave room on a loaded CI box); the model then holds the worker for 0.5 s, past every request's deadline.
    settings = make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0, request_timeout_s=0.25)
    async with running_app(settings, recording_loader(tiny_artifact, delay_s=0.5)) as (client, service):
        responses = await asyncio.gather(*(post_png(client, png_bytes(i)) for i in range(4)))
        await asyncio.sleep(0.5)  # past the first batch's 0.5 s: the worker has reached the queued (expired) items
        batches = service.models.predictor.batches
        assert service.models.batcher.depth == 0
        assert rejected(service, "deadline") == 4  # once per request, not per image too
        assert sum(flushes(service, r) for r in ("full", "timeout", "shutdown")) == 1  # expired items: no batch
    assert [r.status_code for r in responses] == [504] * 4
    assert {r.json()["error"]["code"] for r in responses} == {"deadline_exceeded"}
    assert len(batches) == 1  # only the first image started before its deadline


async def test_one_corrupt_upload_among_concurrent_good_ones_fails_alone(tiny_artifact):
    settings = make_settings(tiny_artifact, max_batch_size=8, max_wait_ms=50)
    async with running_app(settings, recording_loader(tiny_artifact)) as (client, _):
        images = [png_bytes(i) for i in range(5)]
        images[2] = images[2][:60]  # truncated PNG
        responses = await asyncio.gather(*(post_png(client, data) for data in images))
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200]
    for i in (0, 1, 3, 4):
        assert_matches_model(responses[i].json()["results"][0], direct_probs(tiny_artifact, images[i]), 5)


async def test_a_failing_batch_fails_only_its_own_requests(tiny_artifact):
    def fail_on_black(images):
        return RuntimeError("boom") if any(int(img.max()) == 0 for img in images) else None

    black = encode(Image.new("RGB", (40, 40)), "PNG")
    settings = make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0)
    async with running_app(settings, recording_loader(tiny_artifact, fail_when=fail_on_black)) as (client, _):
        responses = await asyncio.gather(*(post_png(client, d) for d in [png_bytes(1), black, png_bytes(2)]))
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert responses[1].json()["error"]["code"] == "inference_failed"


@pytest.mark.parametrize("heatmap", [False, True], ids=["plain", "heatmap"])
async def test_shutdown_drains_queued_requests_with_answers(tiny_artifact, heatmap):
    # A long max_wait: the two images left after the first full batch would wait 10 s, but shutdown releases them.
    # With heatmaps the PNGs are rendered in the thread pool after the batch: stop() must not close it under them
    # (it did: 500).
    settings = make_settings(tiny_artifact, max_batch_size=4, max_wait_ms=10_000)
    params = {"heatmap": "true"} if heatmap else {}
    async with running_app(settings, recording_loader(tiny_artifact, delay_s=0.05)) as (client, service):
        tasks = [asyncio.create_task(post_png(client, png_bytes(i), **params)) for i in range(6)]
        await until(lambda: service.models.predictor.batches and service.models.batcher.depth == 2)
        start = time.monotonic()
        await service.stop()  # what the lifespan does on SIGTERM
        responses = await asyncio.gather(*tasks)
        late = await post_png(client, png_bytes(9))
        assert time.monotonic() - start < 5
        assert flushes(service, "full") == 1 and flushes(service, "shutdown") == 1
        assert [len(b) for b in service.models.predictor.batches] == [4, 2]
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert all(bool(r.json()["results"][0]["heatmap"]) == heatmap for r in responses)
    if heatmap:
        assert all(r.json()["results"][0]["heatmap"]["png"] for r in responses)
    assert late.status_code == 503


# ---------------------------------------------------------------------- the batcher on its own


async def test_batcher_failure_is_confined_to_its_batch():
    def process(items):
        if "bad" in items:
            raise ValueError("bad item in batch")
        return [item.upper() for item in items]

    batcher = DynamicBatcher(process, max_batch_size=2, max_wait_ms=1000)
    batcher.start()
    deadline = time.monotonic() + 5
    first = batcher.submit(["a", "bad"], deadline)
    second = batcher.submit(["c", "d"], deadline)
    results = await asyncio.gather(*first, *second, return_exceptions=True)
    await batcher.close()
    assert isinstance(results[0], ValueError) and isinstance(results[1], ValueError)
    assert [r.value for r in results[2:]] == ["C", "D"]


async def test_batcher_splits_a_batch_that_runs_out_of_memory():
    sizes = []

    def process(items):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return [i * 10 for i in items]

    cleared = []
    batcher = DynamicBatcher(process, max_batch_size=8, max_wait_ms=1000, on_out_of_memory=lambda: cleared.append(1))
    batcher.start()
    futures = batcher.submit(list(range(8)), time.monotonic() + 5)
    results = await asyncio.gather(*futures)
    await batcher.close()
    assert [r.value for r in results] == [i * 10 for i in range(8)]
    assert sizes == [8, 4, 2, 2, 4, 2, 2] and len(cleared) == 3


async def test_batcher_rejects_whole_requests_when_full_and_after_close():
    batcher = DynamicBatcher(lambda items: items, max_batch_size=4, max_wait_ms=1000, queue_limit=3)
    futures = batcher.submit([1, 2], time.monotonic() + 5)  # not started: items stay queued
    with pytest.raises(QueueFullError) as info:
        batcher.submit([3, 4], time.monotonic() + 5)
    assert info.value.retry_after_s >= 1 and batcher.depth == 2  # nothing of the refused request was queued
    batcher.start()
    await batcher.close()  # drains the two queued items
    assert [f.result().value for f in futures] == [1, 2]
    with pytest.raises(BatcherClosedError):
        batcher.submit([5], time.monotonic() + 5)


async def test_batcher_counts_a_wrong_number_of_results_as_failure():
    metrics = Metrics(4)
    batcher = DynamicBatcher(lambda items: items[:-1], max_batch_size=4, max_wait_ms=0, metrics=metrics)
    batcher.start()
    results = await asyncio.gather(*batcher.submit([1, 2], time.monotonic() + 5), return_exceptions=True)
    await batcher.close()
    assert all(isinstance(r, RuntimeError) and "1 results for a batch of 2" in str(r) for r in results)


# ---------------------------------------------------------------------- run(): the one call a caller makes


class GatedModel:
    """A process function that records every batch and holds the inference thread in its first one until the test
    opens the gate, so work can be queued behind a busy model without timing guesses."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.busy = threading.Event()
        self.gate = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.busy.set()
        assert self.gate.wait(5), "the test never opened the gate"
        return [item * 10 for item in items]


async def test_run_gives_each_concurrent_caller_its_own_results_in_order():
    batches = []

    def process(items):
        batches.append(list(items))
        return [f"r{item}" for item in items]

    batcher = DynamicBatcher(process, max_batch_size=4, max_wait_ms=10_000)
    batcher.start()
    requests = [[caller * 10 + j for j in range(caller % 3 + 1)] for caller in range(6)]  # 1, 2 or 3 items; 12 in all
    deadline = time.monotonic() + 5
    answers = await asyncio.wait_for(asyncio.gather(*(batcher.run(items, deadline) for items in requests)), 5)
    await batcher.close()
    assert [[r.value for r in answer] for answer in answers] == [[f"r{i}" for i in items] for items in requests]
    assert [len(b) for b in batches] == [4, 4, 4]  # six callers, three full forward passes, no max_wait
    assert all(r.batch_size == 4 for answer in answers for r in answer)


async def test_run_raises_deadline_exceeded_and_the_model_never_sees_the_expired_items():
    model, metrics = GatedModel(), Metrics(1)
    batcher = DynamicBatcher(model, max_batch_size=1, max_wait_ms=0, metrics=metrics)
    batcher.start()
    first = asyncio.create_task(batcher.run([1], time.monotonic() + 5))
    await until(model.busy.is_set)
    with pytest.raises(DeadlineExceededError):
        await asyncio.wait_for(batcher.run([2, 3], time.monotonic() + 0.05), 5)
    assert batcher.depth == 2  # still queued behind the busy model, but given up
    model.gate.set()
    assert [r.value for r in await asyncio.wait_for(first, 5)] == [10]
    await batcher.close()
    assert model.batches == [[1]] and batcher.depth == 0
    reasons = ("full", "timeout", "shutdown")
    released = {r: metrics.registry.get_sample_value("petvit_batch_flush_total", {"reason": r}) for r in reasons}
    assert released == {"full": 1, "timeout": 0, "shutdown": 0}  # the skipped items formed no batch
    assert metrics.registry.get_sample_value("petvit_batch_size_count") == 1


async def test_a_cancelled_callers_queued_items_are_skipped():
    model = GatedModel()
    batcher = DynamicBatcher(model, max_batch_size=1, max_wait_ms=0)
    batcher.start()
    first = asyncio.create_task(batcher.run([1], time.monotonic() + 5))
    await until(model.busy.is_set)
    gone = asyncio.create_task(batcher.run([2, 3], time.monotonic() + 5))
    await until(lambda: batcher.depth == 2)
    gone.cancel()  # what a client disconnect does to the request's task
    with pytest.raises(asyncio.CancelledError):
        await gone
    later = asyncio.create_task(batcher.run([4], time.monotonic() + 5))
    model.gate.set()
    assert [r.value for r in await asyncio.wait_for(first, 5)] == [10]
    assert [r.value for r in await asyncio.wait_for(later, 5)] == [40]
    await batcher.close()
    assert model.batches == [[1], [4]]


async def test_a_failed_batch_fails_the_call_and_cancels_its_items_still_queued():
    batches = []

    def process(items):
        batches.append(list(items))
        if "bad" in items:
            raise ValueError("bad item in batch")
        return [item.upper() for item in items]

    batcher = DynamicBatcher(process, max_batch_size=2, max_wait_ms=10_000)
    batcher.start()
    with pytest.raises(InferenceFailedError) as info:
        await asyncio.wait_for(batcher.run(["a", "bad", "c"], time.monotonic() + 5), 5)
    await batcher.close()  # releases what is still queued at once
    assert isinstance(info.value.cause, ValueError) and str(info.value.cause) == "bad item in batch"
    assert batches == [["a", "bad"]]  # "c" was waiting for company; the failure of its sibling cancelled it


async def test_run_admits_a_request_whole_or_not_at_all():
    batches = []
    batcher = DynamicBatcher(lambda items: batches.append(list(items)) or items, max_wait_ms=10_000, queue_limit=3)
    admitted = asyncio.create_task(batcher.run([1, 2], time.monotonic() + 5))  # not started: stays queued
    await until(lambda: batcher.depth == 2)
    with pytest.raises(QueueFullError) as info:
        await batcher.run([3, 4], time.monotonic() + 5)
    assert info.value.retry_after_s >= 1 and batcher.depth == 2  # nothing of the refused request was queued
    batcher.start()
    await batcher.close()  # drains the admitted request
    assert [r.value for r in await asyncio.wait_for(admitted, 5)] == [1, 2]
    assert batches == [[1, 2]]
    with pytest.raises(BatcherClosedError):
        await batcher.run([5], time.monotonic() + 5)
