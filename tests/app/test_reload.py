"""Zero-downtime model reload: POST /v1/admin/reload and SIGHUP (app/reload.py, app/routes/admin.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import app.reload
from app.client import wait_until_ready
from app.errors import ServiceError
from app.metrics import RELOAD_OUTCOMES
from app.reload import check_fits, memory_shortfall
from model.artifact import ArtifactMetadata, file_sha256, save_artifact, save_file_atomically
from tests.conftest import make_tiny_config, make_tiny_model

from .fixtures import assert_matches_model, direct_probs, make_settings, metric_value, png_bytes, running_app

KEY = "s3cret-admin"
ADMIN = {"X-Admin-Key": KEY}


@pytest.fixture(scope="module")
def second_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("second") / "second.safetensors"
    save_artifact(make_tiny_model(seed=1), path, {"name": "petvit-tiny-second", "variant": "tiny"})
    return path


def post_png(client, data: bytes):
    return client.post("/classify", content=data, headers={"Content-Type": "image/png"})


def reloads(service, outcome: str) -> float:
    return metric_value(service, "petvit_reloads_total", outcome=outcome)


def model_info(service, sha: str) -> float | None:
    labels = {
        "sha256": sha,
        "name": service.models.predictor.metadata.name,
        "arch": service.models.predictor.architecture,
    }
    return service.metrics.registry.get_sample_value("petvit_model_info", {**labels, "dtype": "float32"})


async def test_a_reload_under_load_loses_nothing_and_each_answer_comes_from_one_model(tiny_artifact, second_artifact):
    old, new = file_sha256(tiny_artifact), file_sha256(second_artifact)
    image = png_bytes(3)
    expected = {old: direct_probs(tiny_artifact, image), new: direct_probs(second_artifact, image)}
    answers: list[tuple[float, int, str | None, dict]] = []  # (sent at, status, header sha, body)
    stop = asyncio.Event()
    # second_artifact lies in a folder of its own: PETVIT_MODEL_DIRS lets the reload reach it
    settings = make_settings(tiny_artifact, admin_key=KEY, max_wait_ms=2, model_dirs=[second_artifact.parent])
    async with running_app(settings) as (client, service):

        async def keep_asking() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                r = await post_png(client, image)
                answers.append((sent, r.status_code, r.headers.get("X-Model-SHA256"), r.json()))

        clients = [asyncio.create_task(keep_asking()) for _ in range(6)]
        await asyncio.sleep(0.3)
        reload = await client.post("/v1/admin/reload", json={"checkpoint": str(second_artifact)}, headers=ADMIN)
        reloaded_at = time.monotonic()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
        info = (await client.get("/v1/model")).json()
        assert model_info(service, new) == 1 and model_info(service, old) is None  # the old label set is gone
        assert reloads(service, "success") == 1
    assert reload.status_code == 200, reload.text
    assert reload.json() | {"load_s": 0} == {
        "status": "reloaded",
        "model": "petvit-tiny-second",
        "sha256": new,
        "previous_sha256": old,
        "checkpoint": str(second_artifact.resolve()),  # the path it loaded: resolved before the folder check
        "load_s": 0,
    }
    assert (info["sha256"], info["checkpoint"]) == (new, str(second_artifact.resolve()))
    assert [status for _, status, _, _ in answers] == [200] * len(answers)
    shas = [body["model_sha256"] for _, _, _, body in answers]
    assert {sha for _, _, sha, _ in answers} == set(shas) == {old, new}  # header and body agree; both served
    for _, _, _, body in answers:  # every answer is entirely its own model's
        assert_matches_model(body["results"][0], expected[body["model_sha256"]], 5)
    after = [body["model_sha256"] for sent, _, _, body in answers if sent > reloaded_at]
    assert after and set(after) == {new}


def pickle_file(path):
    torch.save({"weights": torch.zeros(3)}, path)
    return "pickle"


def truncated_file(path, source):
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return "truncated"


def wrong_shapes_file(path):
    # the tiny model's weights, under metadata that promises a wider model
    tensors = make_tiny_model().state_dict()
    meta = ArtifactMetadata.create(make_tiny_config(hidden_dim=48))
    save_file_atomically(tensors, path, {"petvit": json.dumps(meta.to_dict())})
    return "do not match the stored config"


async def test_a_bad_artifact_is_refused_with_its_reason_and_the_old_model_keeps_serving(tiny_artifact, tmp_path):
    old = file_sha256(tiny_artifact)
    bad = {
        tmp_path / "model.pt": pickle_file(tmp_path / "model.pt"),
        tmp_path / "cut.safetensors": truncated_file(tmp_path / "cut.safetensors", tiny_artifact),
        tmp_path / "wide.safetensors": wrong_shapes_file(tmp_path / "wide.safetensors"),
        tmp_path / "missing.safetensors": "no file this service can read is there",
    }
    settings = make_settings(tiny_artifact, admin_key=KEY, model_dirs=[tmp_path])
    async with running_app(settings) as (client, service):
        for path, reason in bad.items():
            r = await client.post("/v1/admin/reload", json={"checkpoint": str(path)}, headers=ADMIN)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_artifact"
            assert reason in r.json()["error"]["message"] and "keeps serving" in r.json()["error"]["message"]
            answer = await post_png(client, png_bytes(0))
            assert answer.status_code == 200 and answer.json()["model_sha256"] == old
        assert reloads(service, "refused") == 4 and reloads(service, "success") == 0
        assert model_info(service, old) == 1
        assert (await client.get("/v1/model")).json()["sha256"] == old


async def test_reload_is_404_without_an_admin_key_and_401_with_a_wrong_one(tiny_artifact):
    async with running_app(make_settings(tiny_artifact)) as (client, service):
        r = await client.post("/v1/admin/reload", json={"checkpoint": str(tiny_artifact)}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        message = r.json()["error"]["message"]  # says what turns the route on, not just "no route"
        assert "PETVIT_ADMIN_KEY" in message and "X-Admin-Key" in message, message
        assert "/v1/admin/reload" not in (await client.get("/openapi.json")).json()["paths"]  # not advertised
        assert sum(reloads(service, outcome) for outcome in RELOAD_OUTCOMES) == 0
    async with running_app(make_settings(tiny_artifact, admin_key=KEY)) as (client, service):
        for headers in ({}, {"X-Admin-Key": "wrong"}, {"X-Admin-Key": KEY + "x"}):
            r = await client.post("/v1/admin/reload", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert sum(reloads(service, outcome) for outcome in RELOAD_OUTCOMES) == 0
        r = await client.post("/v1/admin/reload", headers=ADMIN)  # no body: PETVIT_CHECKPOINT again
        assert (
            r.status_code == 200
            and r.json()["sha256"] == r.json()["previous_sha256"] == service.models.predictor.sha256
        )


async def test_one_reload_at_a_time(tiny_artifact, second_artifact, monkeypatch):
    settings = make_settings(tiny_artifact, admin_key=KEY, model_dirs=[second_artifact.parent])
    async with running_app(settings) as (client, service):
        original = service.models.loader

        def slow_loader(s):
            time.sleep(0.3)
            return original(s)

        service.models.loader = slow_loader
        body = {"checkpoint": str(second_artifact)}
        first, second = await asyncio.gather(
            client.post("/v1/admin/reload", json=body, headers=ADMIN),
            client.post("/v1/admin/reload", json=body, headers=ADMIN),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409]
        busy = first if first.status_code == 409 else second
        assert busy.json()["error"]["code"] == "reload_in_progress"
        assert (reloads(service, "success"), reloads(service, "busy")) == (1, 1)


async def test_sighup_reloads_the_checkpoint_path_and_the_handler_is_restored(tiny_artifact, second_artifact, tmp_path):
    served = tmp_path / "petvit.safetensors"
    shutil.copy(tiny_artifact, served)
    before = signal.getsignal(signal.SIGHUP)
    async with running_app(make_settings(served)) as (client, service):  # no admin key: SIGHUP works regardless
        assert signal.getsignal(signal.SIGHUP) not in (before, signal.SIG_DFL)  # else the signal would end pytest
        old = service.models.predictor.sha256
        shutil.copy(second_artifact, tmp_path / "next.safetensors")
        os.replace(tmp_path / "next.safetensors", served)  # what a deploy does: a new file at the same path
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):
            if service.models.predictor.sha256 != old:
                break
            await asyncio.sleep(0.01)
        r = await post_png(client, png_bytes(1))
        assert r.json()["model_sha256"] == file_sha256(second_artifact) == service.models.predictor.sha256
        assert metric_value(service, "petvit_reloads_total", outcome="success") == 1
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_model_that_would_not_fit_in_free_gpu_memory_is_refused():
    mib = 2**20
    assert memory_shortfall(free_bytes=400 * mib, artifact_bytes=200 * mib, factor=1.5) is None  # 300 MiB fit
    message = memory_shortfall(free_bytes=250 * mib, artifact_bytes=200 * mib, factor=1.5)
    assert message is not None and "needs about 300 MiB" in message and "only 250 MiB are free" in message


async def test_a_cuda_reload_that_would_not_fit_answers_409_and_changes_nothing(
    tiny_artifact, second_artifact, monkeypatch
):
    size = second_artifact.stat().st_size
    cuda = app.reload.torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (size // 2, 10 * size))  # the driver: 0.5x free
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: size)  # the allocator's cache: 0.5x more unused
    monkeypatch.setattr(cuda, "memory_allocated", lambda device: size // 2)  # -> 1x free, 1.5x needed
    monkeypatch.setattr(app.reload, "_target_device", lambda service: torch.device("cuda"))
    with pytest.raises(ServiceError) as info:
        check_fits(torch.device("cuda"), second_artifact, 1.5)
    assert info.value.status == 409
    check_fits(torch.device("cuda"), second_artifact, 0.99)  # fits
    settings = make_settings(tiny_artifact, admin_key=KEY, model_dirs=[second_artifact.parent])
    async with running_app(settings) as (client, service):
        r = await client.post("/v1/admin/reload", json={"checkpoint": str(second_artifact)}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "insufficient_gpu_memory"
        assert "GPU memory" in r.json()["error"]["message"]
        assert reloads(service, "no_memory") == 1
        assert service.models.predictor.sha256 == file_sha256(tiny_artifact)


def test_sighup_to_petvit_serve_reloads_and_the_process_keeps_serving(tiny_artifact, second_artifact, tmp_path):
    """The real thing: `petvit serve` under uvicorn (which handles SIGINT and SIGTERM itself), sent SIGHUP."""
    served = tmp_path / "petvit.safetensors"
    shutil.copy(tiny_artifact, served)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PETVIT_CHECKPOINT": str(served), "PETVIT_DEVICE": "cpu", "PETVIT_DTYPE": "float32"}
    env |= {"PETVIT_WARMUP": "none", "PETVIT_LOG_LEVEL": "warning", "PETVIT_TORCH_THREADS": "1"}
    command = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(url, timeout=60, interval=0.05, still_running=lambda: server.poll() is None)
        assert httpx.get(f"{url}/v1/model").json()["sha256"] == file_sha256(tiny_artifact)
        shutil.copy(second_artifact, tmp_path / "next.safetensors")
        os.replace(tmp_path / "next.safetensors", served)
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/v1/model").json()["sha256"] != file_sha256(second_artifact):
            assert time.monotonic() < deadline and server.poll() is None, "no reload after SIGHUP"
            time.sleep(0.05)
        answer = httpx.post(f"{url}/classify", content=png_bytes(2), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.headers["X-Model-SHA256"] == file_sha256(second_artifact)
        assert server.poll() is None
    finally:
        server.terminate()
        # SIGTERM still shuts it down: uvicorn drains, then re-raises the signal it caught (hence -15, not 0)
        assert server.wait(30) in (0, -signal.SIGTERM)


async def test_a_reload_brings_up_a_service_whose_first_load_failed(tiny_artifact, tmp_path):
    settings = make_settings(tmp_path / "not-yet.safetensors", admin_key=KEY, model_dirs=[tiny_artifact.parent])
    async with running_app(settings) as (client, service):
        assert service.models.status == "failed" and (await client.get("/readyz")).status_code == 503
        r = await client.post("/v1/admin/reload", json={"checkpoint": str(tiny_artifact)}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["previous_sha256"] is None
        assert (await client.get("/readyz")).status_code == 200
        assert (await post_png(client, png_bytes(0))).json()["model_sha256"] == file_sha256(tiny_artifact)
