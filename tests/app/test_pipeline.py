"""app/pipeline.py's three steps on their own, each on a live service's model generation but without the route:
decode (parameters, headers, body, preparation), predict (the batcher and predict_batch), encode (the response)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from starlette.requests import Request

from app import pipeline
from app.batcher import BatchResult
from app.errors import ServiceError
from app.uploads import Upload
from model.inference import Classifier, ImagePrediction
from model.preprocess import prepare

from .fixtures import direct_probs, make_settings, metric_value, png_bytes, running_app


def raw_request(body: bytes, content_type: str = "image/png") -> Request:
    """A POST /classify request whose body is `body`, as the ASGI server hands it over."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/classify", "headers": headers}, receive)


def connected_request() -> Request:
    """A request whose body has been read and whose client stays connected."""

    async def receive() -> dict:
        await asyncio.Event().wait()  # never: no http.disconnect
        return {}

    return Request({"type": "http", "method": "POST", "path": "/classify", "headers": []}, receive)


def deadline() -> float:
    return time.monotonic() + 30


async def test_decode_reads_admits_and_prepares_each_upload(tiny_artifact) -> None:
    data = png_bytes(4)
    async with running_app(make_settings(tiny_artifact)) as (_, service):
        generation = service.models.live
        with generation.batcher.admit(deadline()) as admission:
            decoded = await pipeline.decode(
                raw_request(data), service, generation, pipeline.ClassifyOptions(top_k=None), admission
            )
            assert admission.images == 1  # its queue room is held until predict queues it
        assert decoded.k == min(service.settings.default_top_k, len(generation.predictor.labels))
        [image] = decoded.images
        expected = prepare(data, generation.predictor.preprocessing, service.settings.max_pixels).tensor
        assert torch.equal(image.prepared.tensor, expected) and image.upload.filename is None
        assert image.preprocess_s > 0


async def test_decode_refuses_bad_parameters_before_reading_the_body(tiny_artifact) -> None:
    async def never(*args: object) -> dict:
        raise AssertionError("the body was read")

    async with running_app(make_settings(tiny_artifact)) as (_, service):
        generation, labels = service.models.live, len(service.models.live.predictor.labels)
        request = Request({"type": "http", "method": "POST", "path": "/classify", "headers": []}, never)
        with generation.batcher.admit(deadline()) as admission, pytest.raises(ServiceError) as refused:
            await pipeline.decode(request, service, generation, pipeline.ClassifyOptions(top_k=labels + 1), admission)
        assert (refused.value.status, refused.value.code) == (422, "invalid_parameters")
        with generation.batcher.admit(deadline()) as admission, pytest.raises(ServiceError) as refused:
            await pipeline.decode(request, service, generation, pipeline.ClassifyOptions(top_k=1), admission)
        assert (refused.value.status, refused.value.code) == (415, "unsupported_media_type")  # no Content-Type


async def test_predict_answers_each_image_through_the_generations_batcher(tiny_artifact) -> None:
    data = [png_bytes(5), png_bytes(6)]
    async with running_app(make_settings(tiny_artifact)) as (_, service):
        generation = service.models.live
        pre, max_pixels = generation.predictor.preprocessing, service.settings.max_pixels
        images = [pipeline.DecodedImage(Upload(d), prepare(d, pre, max_pixels), 0.0) for d in data]
        decoded = pipeline.Decoded(3, images)
        with generation.batcher.admit(deadline()) as admission:
            admission.need(2)
            options = pipeline.ClassifyOptions(top_k=3)
            results = await pipeline.predict(connected_request(), service, generation, decoded, options, admission)
            assert admission.images == 0  # queued: the held room became the queued images
    for d, result in zip(data, results, strict=True):
        torch.testing.assert_close(result.value.probs, direct_probs(tiny_artifact, d), rtol=1e-4, atol=1e-6)
        assert result.value.grid is None and result.batch_size >= 1


def test_predict_batch_decodes_nothing_without_a_decoder_and_keeps_order(tiny_artifact) -> None:
    classifier = Classifier.from_artifact(tiny_artifact, "cpu", "float32")
    pre = classifier.preprocessing
    tensors = [prepare(png_bytes(seed), pre, 10**8).tensor for seed in (7, 8)]
    jobs = [pipeline.ImageJob(tensors[0], heatmap=True), pipeline.ImageJob(tensors[1], heatmap=False)]
    outcomes = pipeline.predict_batch(classifier, None, jobs)
    expected = classifier.predict(tensors, [True, False])
    for got, want in zip(outcomes, expected, strict=True):
        assert isinstance(got, ImagePrediction)
        torch.testing.assert_close(got.probs, want.probs)
    assert outcomes[0].grid is not None and outcomes[1].grid is None


async def test_encode_builds_the_response_with_top_k_overlay_and_timings(tiny_artifact) -> None:
    data = png_bytes(9, size=(80, 60))
    async with running_app(make_settings(tiny_artifact)) as (_, service):
        classifier = service.models.live.predictor
        prepared = prepare(data, classifier.preprocessing, service.settings.max_pixels)
        probs = torch.softmax(torch.arange(len(classifier.labels), dtype=torch.float32), dim=0)
        grid = torch.rand(4, 4)
        result = BatchResult(ImagePrediction(probs, grid, None), queue_wait_s=0.002, inference_s=0.003, batch_size=2)
        decoded = pipeline.Decoded(2, [pipeline.DecodedImage(Upload(data, "cat.png"), prepared, 0.001)])
        options = pipeline.ClassifyOptions(top_k=2, heatmap=True, heatmap_png=True, heatmap_method="rollout")
        images_before = metric_value(service, "petvit_images_total")
        answer = await pipeline.encode(service, classifier, decoded, [result], options, time.monotonic())
        assert metric_value(service, "petvit_images_total") == images_before + 1
    assert answer.model_sha256 == classifier.sha256 and answer.model == classifier.metadata.name
    [image] = answer.results
    last = len(classifier.labels) - 1
    assert [p.index for p in image.predictions] == [last, last - 1]  # highest first
    assert (image.filename, image.width, image.height, image.unknown) == ("cat.png", 80, 60, None)
    assert image.heatmap is not None and image.heatmap.png and (image.heatmap.rows, image.heatmap.cols) == (4, 4)
    assert (image.timings.preprocess_ms, image.timings.queue_ms, image.timings.inference_ms) == (1.0, 2.0, 3.0)
    assert image.timings.batch_size == 2
