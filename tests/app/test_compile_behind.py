"""Ready in seconds, full speed soon after: with PETVIT_COMPILE (or int8) the eager model serves at once and the
compiled one is built behind it, checked against eager float32 on a probe batch, and swapped in through the
reload's generation swap; a compiled forward that disagrees or a compile that raises leaves eager serving, counted
and logged. torch.compile is stood in (a real one takes minutes on this CPU); the real int8 path is in
test_compile_and_int8.py."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

import pytest
import torch

from app.config import Settings
from app.lifecycle import CompileState
from model.compile_cache import kernel_key

from .fixtures import make_settings, metric_value, png_bytes, running_app, until


def gated_compile(gate: threading.Event, shapes: list[int], scale: float = 1.0) -> Callable:
    """Stands in for torch.compile: the eager model times `scale` (1: a faithful compile; anything else: a wrong
    kernel), each call waiting for `gate` first (the compile's minutes) and recording its batch size."""

    def compile(model: torch.nn.Module, **options: object) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(images: torch.Tensor) -> torch.Tensor:
            assert gate.wait(30), "the test never opened the gate"
            shapes.append(images.shape[0])
            return model(images) * scale

        return forward

    return compile


def open_gate() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


async def top1(client, seeds: range) -> list[tuple[str, float]]:
    files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in seeds]
    response = await client.post("/classify", files=files)
    assert response.status_code == 200, response.text
    return [(r["predictions"][0]["label"], r["predictions"][0]["score"]) for r in response.json()["results"]]


async def settled(service) -> None:
    await until(lambda: service.models.compile_state is not CompileState.compiling, timeout_s=60)


async def test_ready_with_eager_at_once_then_the_compiled_model_takes_over_losing_no_request(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, shapes = threading.Event(), []
    monkeypatch.setattr(torch, "compile", gated_compile(gate, shapes))
    async with running_app(make_settings(tiny_artifact, compile=True, max_batch_size=8)) as (client, service):
        # Ready while the compile is still held at the gate.
        ready, info = await client.get("/readyz"), (await client.get("/v1/model")).json()
        assert ready.status_code == 200 and not service.models.predictor.compiled
        assert info["serving"] == "eager" and info["compile"] == "compiling" and shapes == []
        assert metric_value(service, "petvit_compiled_serving") == 0
        assert "compiling the faster forward behind it" in service.models.message
        before = await top1(client, range(6))
        eager = service.models.live

        codes: list[int] = []

        async def keep_asking() -> None:  # requests before, during and after the swap
            while not service.models.predictor.compiled or len(codes) < 40:
                response = await client.post("/classify", content=png_bytes(7), headers={"Content-Type": "image/png"})
                codes.append(response.status_code)

        asking = asyncio.create_task(keep_asking())
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asking, 60)
        await asyncio.gather(*service.models._retiring)
        after = await top1(client, range(6))
        info = (await client.get("/v1/model")).json()
        assert eager.batcher._closing  # the eager generation retired once its requests were answered
    assert codes and set(codes) == {200}, codes
    assert [label for label, _ in after] == [label for label, _ in before]
    for (_, was), (_, now) in zip(before, after, strict=True):
        assert now == pytest.approx(was, rel=1e-5)
    assert info["serving"] == "compiled" and info["compile"] == "agreed" and service.models.predictor.compiled
    # Every bucket compiled (warm-up) and the probe batch checked before it went live.
    assert sorted(set(shapes)) == [1, 2, 4, 8] == service.models.predictor.buckets
    assert metric_value(service, "petvit_compiled_serving") == 1
    assert metric_value(service, "petvit_compile_checks_total", outcome="agreed") == 1
    assert metric_value(service, "petvit_compile_checks_total", outcome="disagreed") == 0


async def test_a_compiled_forward_that_disagrees_with_float32_leaves_eager_serving(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale or wrong kernel (the stand-in's logits are off by a factor of -3) never serves."""
    monkeypatch.setattr(torch, "compile", gated_compile(open_gate(), [], scale=-3.0))
    with caplog.at_level(logging.WARNING, logger="petvit.service"):
        async with running_app(make_settings(tiny_artifact, compile=True, max_batch_size=4)) as (client, service):
            await settled(service)
            info = (await client.get("/v1/model")).json()
            answered = await client.post("/classify", content=png_bytes(1), headers={"Content-Type": "image/png"})
    assert answered.status_code == 200 and not service.models.predictor.compiled
    assert info["serving"] == "eager" and info["compile"] == "disagreed"
    assert metric_value(service, "petvit_compile_checks_total", outcome="disagreed") == 1
    assert metric_value(service, "petvit_compile_checks_total", outcome="agreed") == 0
    assert metric_value(service, "petvit_compiled_serving") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "serving the eager model: the float32 forward disagrees with eager float32" in warnings[0]
    assert "relative error 4 (tolerance 0.001)" in warnings[0]


async def test_a_compile_that_raises_leaves_eager_serving(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(model: torch.nn.Module, **options: object) -> Callable:
        raise RuntimeError("C++ compile error:\nundefined reference")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="petvit.service"):
        async with running_app(make_settings(tiny_artifact, compile=True)) as (client, service):
            await settled(service)
            info = (await client.get("/v1/model")).json()
            ready = await client.get("/readyz")
    assert ready.status_code == 200 and info["serving"] == "eager" and info["compile"] == "failed"
    assert metric_value(service, "petvit_compile_checks_total", outcome="failed") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"serving the eager model: compiling {tiny_artifact} failed: RuntimeError: C++ compile error: undefined "
        "reference"
    ]


async def test_without_compile_the_eager_model_is_the_model(tiny_artifact) -> None:
    async with running_app(make_settings(tiny_artifact)) as (client, service):
        info = (await client.get("/v1/model")).json()
    assert info["serving"] == "eager" and info["compile"] == "off" and service.models._compiling is None
    assert sum(metric_value(service, "petvit_compile_checks_total", outcome=o) for o in CompileState) == 0


async def test_a_reload_while_compiling_drops_the_stale_compiled_model(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled model of an artifact that no longer serves must not be swapped back in."""
    gate, shapes = threading.Event(), []
    monkeypatch.setattr(torch, "compile", gated_compile(gate, shapes))
    settings = make_settings(tiny_artifact, compile=True, max_batch_size=2, admin_key="k")
    async with running_app(settings) as (client, service):
        first = service.models._compiling
        reloaded = await client.post("/v1/admin/reload", json={}, headers={"X-Admin-Key": "k"})
        await asyncio.gather(first, return_exceptions=True)
        assert reloaded.status_code == 200 and first.cancelled()
        reloaded_eager = service.models.live
        gate.set()
        await settled(service)
    assert service.models.compile_state is CompileState.agreed
    assert metric_value(service, "petvit_compile_checks_total", outcome="agreed") == 1  # the reload's one only
    assert service.models.live is not reloaded_eager and service.models.live.predictor.compiled


async def test_the_compile_cache_lives_under_the_kernel_key(
    tiny_artifact, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)  # restored after the test: use_compile_cache sets them
    monkeypatch.setattr(torch, "compile", gated_compile(open_gate(), []))
    settings = make_settings(tiny_artifact, compile=True, compile_cache_dir=tmp_path / "kept")
    async with running_app(settings) as (_, service):
        await settled(service)
    folder = tmp_path / "kept" / kernel_key(torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
    assert (folder / "kernel_facts.json").is_file() and service.models.compile_state is CompileState.agreed


async def test_an_unusable_compile_cache_folder_costs_a_cold_cache_not_the_service(
    tiny_artifact, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(torch, "compile", gated_compile(open_gate(), []))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="petvit.service"):
        async with running_app(make_settings(tiny_artifact, compile=True, compile_cache_dir=blocker)) as (_, service):
            await settled(service)
    assert service.models.compile_state is CompileState.agreed and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert any(f"compile cache {blocker} not used" in r.getMessage() for r in caplog.records)


def test_the_compile_cache_folder_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().compile_cache_dir is None
    monkeypatch.setenv("PETVIT_COMPILE_CACHE_DIR", "/var/cache/petvit/compile")
    assert str(Settings().compile_cache_dir) == "/var/cache/petvit/compile"


async def test_int8_that_disagrees_with_float32_never_answers_float32_does(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Eager int8 is checked against float32 before it serves: an unfaithful int8 (here its logits ten times too
    large, as a saturating kernel would make them wrong) never answers; float32 does, and nothing compiles."""
    import model.inference as inference

    quantise = inference.quantise_int8

    def unfaithful(model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            model.head.weight.mul_(10)
            model.head.bias.mul_(10)
        return quantise(model)

    compiled: list[object] = []
    monkeypatch.setattr(inference, "quantise_int8", unfaithful)
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or model)
    caplog.set_level(logging.WARNING, logger="petvit.service")
    files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
    async with running_app(make_settings(tiny_artifact, dtype="int8")) as (client, service):
        assert service.models.ready, service.models.message
        info = (await client.get("/v1/model")).json()
        served = (await client.post("/classify", files=files, params={"top_k": 5})).json()
        assert metric_value(service, "petvit_int8_checks_total", outcome="disagreed") == 1
        assert metric_value(service, "petvit_int8_checks_total", outcome="agreed") == 0
        assert "int8 disagreed with float32" in service.models.message
    assert (info["dtype"], info["serving"], info["compile"]) == ("float32", "eager", "off")
    assert compiled == []  # the compiled int8 model would disagree too: not built
    assert any("serving float32 instead of int8" in r.getMessage() for r in caplog.records)
    async with running_app(make_settings(tiny_artifact, dtype="float32")) as (client, _):
        reference = (await client.post("/classify", files=files, params={"top_k": 5})).json()
    answers = [[r["predictions"] for r in answer["results"]] for answer in (served, reference)]
    assert answers[0] == answers[1]  # float32's own answers, digit for digit
