"""/healthz, /readyz, /v1/model, /metrics, OpenAPI and CORS."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from model.artifact import file_sha256

from .fixtures import make_settings, png_bytes, recording_loader, rejected, running_app, until


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_health_and_readiness_once_warmed_up(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["device"] == "cpu"
    assert ready.json()["dtype"] == "float32"


async def test_readyz_is_503_until_loading_has_finished(tiny_artifact):
    release = asyncio.Event()
    base_loader = recording_loader(tiny_artifact)
    loop = asyncio.get_running_loop()

    def slow_loader(settings):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        return base_loader(settings)

    async with running_app(make_settings(tiny_artifact), slow_loader, wait_ready=False) as (client, service):
        early = await client.get("/readyz")
        health = await client.get("/healthz")
        release.set()
        await until(lambda: service.models.status == "ready")
        late = await client.get("/readyz")
    assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
    assert str(tiny_artifact) in early.json()["error"]["message"]
    assert health.status_code == 200 and late.status_code == 200


async def test_model_endpoint_describes_the_artifact(client, tiny_artifact):
    info = (await client.get("/v1/model")).json()
    assert info["name"] == "petvit-tiny-test" and info["variant"] == "tiny" and info["trained"] is False
    assert info["num_labels"] == len(info["labels"]) == 37 and info["labels"][0] == "Abyssinian"
    assert info["species"][0] == "cat" and info["image_size"] == 32
    assert info["preprocessing"]["resize_size"] == 37 and len(info["preprocessing"]["mean"]) == 3
    assert info["evaluation"] == {"top1": 0.5}
    assert info["sha256"] == file_sha256(tiny_artifact)


async def test_metrics_count_requests_images_and_batches(served, tiny_artifact):
    client, service = served
    files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
    answers = await asyncio.gather(
        client.post("/classify", files=files),
        client.post("/classify", content=png_bytes(5), headers={"Content-Type": "image/png"}),
        client.post("/classify", content=png_bytes(6), headers={"Content-Type": "image/png"}),
        client.post("/classify", content=b"not an image", headers={"Content-Type": "image/png"}),
    )
    assert [a.status_code for a in answers] == [200, 200, 200, 400]
    await client.get("/healthz")
    text = (await client.get("/metrics")).text
    s = samples(text)
    batches = service.models.predictor.batches
    assert s[("petvit_requests_total", (("route", "/classify"), ("status", "200")))] == 3
    assert s[("petvit_requests_total", (("route", "/classify"), ("status", "400")))] == 1
    assert s[("petvit_requests_total", (("route", "/healthz"), ("status", "200")))] == 1
    assert s[("petvit_request_duration_seconds_count", (("route", "/classify"),))] == 4
    assert s[("petvit_images_total", ())] == 5
    assert s[("petvit_preprocess_duration_seconds_count", ())] == 5
    assert s[("petvit_queue_wait_seconds_count", ())] == 5
    assert s[("petvit_batch_size_count", ())] == len(batches)
    assert s[("petvit_batch_size_sum", ())] == 5
    assert s[("petvit_inference_duration_seconds_count", ())] == len(batches)
    flushed = sum(s[("petvit_batch_flush_total", (("reason", r),))] for r in ("full", "timeout", "shutdown"))
    assert flushed == len(batches)
    assert s[("petvit_queue_depth", ())] == 0
    assert s[("petvit_rejected_total", (("reason", "bad_image"),))] == 1
    info = [k for k in s if k[0] == "petvit_model_info"]
    assert len(info) == 1 and dict(info[0][1])["sha256"] == file_sha256(tiny_artifact)
    assert dict(info[0][1])["dtype"] == "float32"  # the dtype the predictor computes in
    assert not any(k[0].startswith("petvit_gpu_") for k in s)  # GPU gauges only on CUDA


async def test_openapi_documents_classify_with_examples(client):
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/classify"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert {"200", "400", "413", "415", "422", "429", "503", "504"} <= set(op["responses"])
    assert spec["components"]["schemas"]["ClassifyResponse"]["examples"]
    assert (await client.get("/docs")).status_code == 200


async def test_cors_origins_from_settings(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, cors_origins=["https://pets.example"])) as (client, _):
        preflight = await client.options(
            "/classify",
            headers={"Origin": "https://pets.example", "Access-Control-Request-Method": "POST"},
        )
        other = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://pets.example"
    assert "access-control-allow-origin" not in other.headers


async def test_rejections_count_refused_classify_requests_once_each_and_not_probes(tmp_path, tiny_artifact):
    # Not ready: readiness probes and /v1/model polls are not refused requests; the one /classify is.
    async with running_app(make_settings(tmp_path / "missing.safetensors")) as (client, service):
        for _ in range(3):
            assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/v1/model")).status_code == 503
        assert (
            await client.post("/classify", content=png_bytes(1), headers={"Content-Type": "image/png"})
        ).status_code == 503
        assert rejected(service, "not_ready") == 1
    # Refusals while reading the body count like refusals while decoding it.
    async with running_app(make_settings(tiny_artifact, max_files=1)) as (client, service):
        refused = [
            await client.post("/classify", content=b"hi", headers={"Content-Type": "text/plain"}),
            await client.post("/classify", files=[("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(2)]),
            await client.post("/classify", files={"other": ("a.png", png_bytes(1), "image/png")}),
            await client.post("/classify", content=b"x", headers={"Content-Type": "multipart/form-data"}),
        ]
        assert [r.status_code for r in refused] == [415, 413, 422, 400]
        counts = {
            reason: rejected(service, reason)
            for reason in ("unsupported_type", "too_large", "bad_request", "bad_image")
        }
    assert counts == {"unsupported_type": 1, "too_large": 1, "bad_request": 1, "bad_image": 1}
