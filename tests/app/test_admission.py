"""Overload admission: refusals before the body is read or decoded, by queue room and by deadline, with an honest
Retry-After; queued images of clients that went away never reach the model (app/batcher.py, app/pipeline.py)."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time

import httpx
import pytest

import app.pipeline
from app.batch_errors import OverloadedError, QueueFullError
from app.batcher import DynamicBatcher

from .fixtures import (
    live_server,
    make_settings,
    metric_value,
    png_bytes,
    recording_loader,
    rejected,
    running_app,
    until,
)


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Every upload the route decodes, counted at model.preprocess.prepare as the pipeline calls it."""
    calls: list[int] = []
    real = app.pipeline.prepare

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(app.pipeline, "prepare", counting)
    return calls


def post_png(client, data: bytes):
    return client.post("/classify", content=data, headers={"Content-Type": "image/png"})


def post_files(client, images: list[bytes]):
    return client.post("/classify", files=[("file", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)])


async def test_a_full_queue_refuses_before_reading_or_decoding(tiny_artifact, decodes):
    settings = make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0, queue_limit=2, max_files=2)
    async with running_app(settings, recording_loader(tiny_artifact, delay_s=0.3)) as (client, service):
        raw = [post_png(client, png_bytes(i)) for i in range(4)]
        multipart = [post_files(client, [png_bytes(10 + i), png_bytes(20 + i)]) for i in range(3)]
        responses = await asyncio.gather(*raw, *multipart)
        queue_full = rejected(service, "queue_full")
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    images_answered = sum(len(r.json()["results"]) for r in responses if r.status_code == 200)
    assert len(decodes) == images_answered  # no refused request had an image decoded
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    assert queue_full == codes.count(429)


async def test_a_request_that_would_miss_its_deadline_gets_429_with_retry_after_instead_of_504(tiny_artifact, decodes):
    # 0.3 s per image (a little more, measured), 1 s deadline: two images fit in 90 % of it, a third (0.9 s+) does not.
    # The measured time per image may grow to 0.445 s on a loaded machine before the second would not fit either.
    settings = make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0, queue_limit=16, request_timeout_s=1.0)
    async with running_app(settings, recording_loader(tiny_artifact, delay_s=0.3)) as (client, service):
        assert (await post_png(client, png_bytes(0))).status_code == 200  # measures the time per image
        await until(lambda: service.models.batcher.policy.seconds_per_image is not None)  # recorded after answering
        per_image = service.models.batcher.policy.seconds_per_image
        decodes.clear()
        responses = await asyncio.gather(*(post_png(client, png_bytes(i)) for i in range(1, 7)))
        overloaded = rejected(service, "overloaded")
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 2 and codes.count(429) == 4, codes  # no 504: nobody was admitted to wait in vain
    assert len(decodes) == 2 and overloaded == 4
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"overloaded"}
    # Honest: each refused request saw the two admitted images and itself (a refusal holds no room): 3 x per_image,
    # which fits 90 % of a fresh 1 s deadline once the queue has drained by 3 x per_image - 0.9 s.
    retry = {int(r.headers["Retry-After"]) for r in refused}
    assert retry == {max(1, math.ceil(3 * per_image - 0.9))}, (retry, per_image)


async def test_what_the_headers_refuse_is_refused_as_such_even_when_overloaded(tiny_artifact, decodes):
    settings = make_settings(tiny_artifact, max_upload_bytes=1000)
    async with running_app(settings) as (client, service):
        service.models.batcher.policy.seconds_per_image = (
            100.0  # as if the model took 100 s an image: nothing fits 30 s
        )
        png = png_bytes(0)[:900]
        overloaded = await post_png(client, png)
        wrong_type = await client.post("/classify", content=png, headers={"Content-Type": "text/plain"})
        too_big = await post_png(client, png_bytes(0, (200, 200)))  # declared Content-Length over 1000 bytes
        assert rejected(service, "overloaded") == 1
    assert overloaded.status_code == 429 and overloaded.json()["error"]["code"] == "overloaded"
    assert overloaded.headers["Retry-After"] == str(math.ceil(100 - 0.9 * 30))  # until 100 s fits 90 % of 30 s
    assert (wrong_type.status_code, too_big.status_code) == (415, 413)
    assert decodes == []
    # refused by the fast path before FastAPI's routing, yet labelled with the route
    assert metric_value(service, "petvit_requests_total", route="/classify", status="429") == 1


async def test_under_overload_a_wrong_api_key_is_still_401(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, api_key="k")) as (client, service):
        service.models.batcher.policy.seconds_per_image = 100.0
        anonymous = await post_png(client, png_bytes(0))
        keyed = await client.post(
            "/classify", content=png_bytes(0), headers={"Content-Type": "image/png", "X-API-Key": "k"}
        )
    assert (anonymous.status_code, keyed.status_code) == (401, 429)


async def test_admission_holds_room_from_before_the_body_is_read_until_the_images_are_queued():
    batcher = DynamicBatcher(lambda items: items, max_batch_size=4, queue_limit=3, request_timeout_s=1.0)
    deadline = time.monotonic() + 1.0
    with batcher.admit(deadline) as first:
        first.need(1)
        first.need(2)  # a second multipart image started: one more slot
        with batcher.admit(deadline) as second:
            second.need(1)
            with pytest.raises(QueueFullError):
                batcher.admit(deadline).need(1)  # 2 + 1 held: no room, although nothing is queued yet
        batcher.submit(["a", "b"], deadline, first)  # the held room becomes the queued items
        assert (batcher.depth, batcher.policy.reserved) == (2, 0)
    batcher.admit(deadline).need(1)  # the second request's room was released when it left


async def test_retry_after_is_the_time_until_the_estimated_wait_fits_a_fresh_deadline():
    batcher = DynamicBatcher(lambda items: items, max_batch_size=4, queue_limit=12, request_timeout_s=1.0)
    deadline = time.monotonic() + 1.0
    batcher.submit(list(range(10)), deadline)  # not started: all stay queued
    batcher.policy.seconds_per_image = 0.5  # 10 queued + 1 = 11 images, 3 batches of 4: 6 s > 1 s left
    with pytest.raises(OverloadedError) as info:
        batcher.check(1, deadline)
    # a fresh request is admitted when its wait is within 90 % of its 1 s: once 6 - 0.9 = 5.1 s have drained
    assert (info.value.retry_after_s, info.value.estimated_s) == (6, pytest.approx(6.0))
    with pytest.raises(QueueFullError) as full:
        batcher.check(3, time.monotonic() + 100)  # 13 > 12: one image over, 0.5 s to drain; at least the batch wait
    assert type(full.value) is QueueFullError and full.value.retry_after_s == max(1, batcher.retry_after_s())
    batcher.check(1, time.monotonic() + 6.7)  # 6 s is within 90 % of 6.7 s
    with pytest.raises(OverloadedError):
        batcher.check(1, time.monotonic() + 6.5)  # but not of 6.5 s


def _metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_disconnected_clients_queued_images_are_not_run(tiny_artifact):
    loaded = []

    def loader(settings):
        loaded.append(recording_loader(tiny_artifact, delay_s=0.6)(settings))
        return loaded[-1]

    settings = make_settings(tiny_artifact, max_batch_size=1, max_wait_ms=0)
    with live_server(settings, loader=loader) as url:
        request = {"content": png_bytes(1), "headers": {"Content-Type": "image/png"}}
        busy = threading.Thread(target=httpx.post, args=(f"{url}/classify",), kwargs=request)
        busy.start()  # holds the model for 0.6 s
        deadline = time.monotonic() + 5
        while not loaded[0].batches and time.monotonic() < deadline:
            time.sleep(0.01)
        body = png_bytes(2)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            head = (
                f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            conn.sendall(head.encode() + body)
            while _metric(url, "petvit_queue_depth") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _metric(url, "petvit_queue_depth") == 1
        busy.join(5)  # the model is free again: the dropped image would be next
        while _metric(url, "petvit_dropped_images_total", reason="cancelled") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _metric(url, "petvit_dropped_images_total", reason="cancelled") == 1
        assert _metric(url, "petvit_rejected_total", reason="disconnected") == 1
        assert len(loaded[0].batches) == 1  # only the first request's image ever reached the model
