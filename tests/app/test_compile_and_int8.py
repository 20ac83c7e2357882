"""PETVIT_COMPILE and PETVIT_DTYPE=int8 in the service: batches padded to buckets answer exactly as unpadded ones,
the compiled model compiles every bucket before it takes over from the eager one, int8 is served (eager int8 at once,
compiled soon after, the same top-1 answers) and named, a missing torchao is reported."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError

from app.config import Settings, describe_invalid_settings
from model.artifact import save_artifact
from model.batch_sizes import bucket_for, bucket_split
from model.inference import Classifier, GraphThread, compiled_forward
from tests.conftest import make_tiny_model

from .fixtures import direct_probs, make_settings, metric_value, png_bytes, running_app, until


@pytest.fixture(scope="module")
def second_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("second") / "second.safetensors"
    save_artifact(make_tiny_model(seed=1), path, {"name": "petvit-tiny-second", "variant": "tiny"})
    return path


def recording_compile(shapes: list[int]) -> Callable:
    """Stands in for torch.compile: the eager model, recording the batch size of every call it gets."""

    def compile(model: torch.nn.Module, **options: object) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(images: torch.Tensor) -> torch.Tensor:
            shapes.append(images.shape[0])
            return model(images)

        return forward

    return compile


def random_images(count: int, size: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(count)]


@pytest.mark.parametrize(("batch", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 12), (12, 12)])
def test_each_batch_size_goes_to_the_smallest_bucket_that_holds_it(batch: int, bucket: int) -> None:
    assert bucket_for(batch, [1, 2, 4, 8, 12]) == bucket


def test_a_batch_past_the_largest_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="a batch of 13 is larger than the largest bucket, 12"):
        bucket_for(13, [1, 2, 4, 8, 12])


@pytest.mark.parametrize(("batch", "chunks"), [(1, [1]), (3, [2, 1]), (7, [4, 2, 1]), (8, [8]), (13, [8, 4, 1])])
def test_a_cpu_batch_splits_into_buckets_largest_first(batch: int, chunks: list[int]) -> None:
    assert bucket_split(batch, [1, 2, 4, 8]) == chunks
    assert bucket_split(11, [1, 2, 4, 8, 12]) == [8, 2, 1]  # a max batch that is no power of two is a bucket too


def test_cpu_batches_split_into_buckets_answer_exactly_as_whole_ones(tiny_artifact, monkeypatch) -> None:
    shapes: list[int] = []
    monkeypatch.setattr(torch, "compile", recording_compile(shapes))
    eager = Classifier.from_artifact(tiny_artifact, "cpu", "float32")
    bucketed = Classifier.from_artifact(tiny_artifact, "cpu", "float32", compile=True, max_batch_size=8)
    assert bucketed.compiled and bucketed.buckets == [1, 2, 4, 8] and eager.buckets is None
    images = random_images(11)
    for n in (1, 3, 5, 8, 11):
        got, want = bucketed.predict(images[:n]), eager.predict(images[:n])
        assert len(got) == n
        for g, w in zip(got, want, strict=True):
            # Rows never mix, but a float32 GEMM of other rows (M) may round the last bit otherwise (batch 1 is
            # even a GEMV): equal to float32's last bits, not bit for bit.
            torch.testing.assert_close(g.probs, w.probs, rtol=1e-5, atol=1e-7)
    # bucket sizes only, and not one padding row: 1 | 2+1 | 4+1 | 8 | 8+2+1
    assert shapes == [1, 2, 1, 4, 1, 8, 8, 2, 1] and sum(shapes) == 1 + 3 + 5 + 8 + 11
    # A mixed batch: the two plain images take the compiled path (bucket 2), the heatmap image the eager one.
    shapes.clear()
    mixed = bucketed.predict(images[:3], [False, True, False])
    assert shapes == [2] and mixed[1].grid is not None and mixed[0].grid is None
    for g, w in zip(mixed, eager.predict(images[:3], [False, True, False]), strict=True):
        assert torch.equal(g.probs, w.probs)


async def test_warm_up_compiles_every_bucket_before_the_compiled_model_serves(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes: list[int] = []
    monkeypatch.setattr(torch, "compile", recording_compile(shapes))
    # warmup="none" would skip an eager warm-up; a compiled one still warms its buckets (or requests would compile).
    settings = make_settings(tiny_artifact, compile=True, warmup="none", max_batch_size=8)
    async with running_app(settings) as (client, service):
        assert service.models.ready, (
            service.models.message
        )  # eager first (test_compile_behind.py), the compiled one behind it
        await until(lambda: service.models.predictor.compiled)
        assert sorted(set(shapes)) == [1, 2, 4, 8] == service.models.predictor.buckets
        assert "compiled" in service.models.message
        shapes.clear()
        files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
        response = await client.post("/classify", files=files)
    assert response.status_code == 200, response.text
    assert shapes == [2, 1]  # three images on a CPU: buckets 2 and 1, no padding row


def test_gpu_batches_are_padded_to_one_bucket(tiny_artifact, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a call costs a launch and a few more rows cost little: one padded call, the padding's rows dropped.
    The device is only named "cuda" here (the stand-in forward runs on the CPU), so this runs without a GPU."""
    shapes: list[int] = []
    monkeypatch.setattr(torch, "compile", recording_compile(shapes))
    eager = Classifier.from_artifact(tiny_artifact, "cpu", "float32")
    padded = Classifier.from_artifact(tiny_artifact, "cpu", "float32", compile=True, max_batch_size=8)
    padded.device = torch.device("cuda")
    images = torch.stack(random_images(11))
    for n in (3, 5, 11):  # 11: past the largest bucket, run as 8 + 3 (padded to 4)
        torch.testing.assert_close(padded.logits(images[:n]), eager.logits(images[:n]), rtol=1e-5, atol=1e-6)
    assert shapes == [4, 8, 8, 4]


def graph_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("petvit-cuda-graphs")]


async def test_a_retired_generation_shuts_its_cuda_graph_thread_down(tiny_artifact, second_artifact, monkeypatch):
    """CUDA graphs ("reduce-overhead") run the compiled forward on a thread of its own (model.inference.GraphThread);
    a reload retires the old generation, which shuts that thread down instead of leaving one behind per reload, and
    shutdown does the same for the live one. The device is only named "cuda" here: torch.compile is stood in by the
    eager function, so each graphs' thread runs the CPU forward."""
    monkeypatch.setattr(torch, "compile", lambda target, **options: target)
    loaded: list[Classifier] = []

    def load(settings: Settings) -> Classifier:
        classifier = Classifier.from_artifact(settings.checkpoint, "cpu", "float32")
        classifier.runner.compile_mode = "reduce-overhead"  # what prepare_for_inference picks on a CUDA device
        classifier.runner._forward = compiled_forward(classifier.model, "reduce-overhead")
        loaded.append(classifier)
        return classifier

    before = len(graph_threads())
    async with running_app(make_settings(tiny_artifact, admin_key="k", model_dirs=[second_artifact.parent]), load) as (
        client,
        service,
    ):
        assert service.models.ready and len(graph_threads()) == before + 1  # warm-up ran on the first model's thread
        reloaded = await client.post(
            "/v1/admin/reload", json={"checkpoint": str(second_artifact)}, headers={"X-Admin-Key": "k"}
        )
        assert reloaded.status_code == 200
        await asyncio.gather(*service.models._retiring)
        assert isinstance(loaded[0].runner._forward, GraphThread) and loaded[0].runner._forward.pool._shutdown
        assert len(graph_threads()) == before + 1  # the new model's thread only
        response = await client.post("/classify", content=png_bytes(1), headers={"Content-Type": "image/png"})
        assert response.status_code == 200  # the live model still answers through its own thread
    assert len(graph_threads()) == before  # shutdown closed the live one's too


async def test_int8_is_served_named_and_close_to_float32(tiny_artifact) -> None:
    """The real thing: torchao quantisation and torch.compile, through the service (two buckets: 1 and 2). Eager
    int8 serves at once; the compiled int8 model takes over once it agrees with float32, with the same top-1."""
    settings = make_settings(tiny_artifact, dtype="int8", max_batch_size=2)
    data = png_bytes(3)
    files = [("file", ("a.png", data, "image/png")), ("file", ("b.png", png_bytes(4), "image/png"))]
    async with running_app(settings) as (client, service):
        assert service.models.ready and not service.models.predictor.compiled, (
            service.models.message
        )  # eager int8, before any compile
        eager_info = (await client.get("/v1/model")).json()
        assert metric_value(service, "petvit_int8_checks_total", outcome="agreed") == 1  # checked before it served
        eager = (await client.post("/classify", files=files, params={"top_k": 37})).json()
        await until(lambda: service.models.compile_state != "compiling", timeout_s=600)  # compiling takes a while
        assert service.models.compile_state == "agreed", service.models.message
        ready, info = (await client.get("/readyz")).json(), (await client.get("/v1/model")).json()
        response = await client.post("/classify", files=files, params={"top_k": 37, "heatmap": "true"})
        gradient = await client.post("/classify", files=files, params={"heatmap": "true", "heatmap_method": "gradient"})
    assert ready["dtype"] == "int8" and info["dtype"] == "int8" == eager_info["dtype"]
    assert (eager_info["serving"], info["serving"]) == ("eager", "compiled")
    assert [r["predictions"][0]["label"] for r in eager["results"]] == [
        r["predictions"][0]["label"] for r in response.json()["results"]
    ]
    # int8 layers give no gradients: a 422 saying what to use instead, never the batch's 500.
    assert gradient.status_code == 422 and gradient.json()["error"]["code"] == "invalid_parameters"
    assert "heatmap_method=rollout" in gradient.json()["error"]["message"]
    assert service.models.predictor.compiled and service.models.predictor.buckets == [1, 2]
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    served = torch.zeros(37)
    for p in result["predictions"]:
        served[p["index"]] = p["score"]
    assert (served - direct_probs(tiny_artifact, data)).abs().max() < 0.02  # int8 rounding, measured ~0.002
    assert result["heatmap"] is not None  # rollout runs on the int8 weights


async def test_int8_without_torchao_leaves_the_service_up_and_names_the_extra(
    tiny_artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # as on an install without the [int8] extra
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    async with running_app(make_settings(tiny_artifact, dtype="int8")) as (client, service):
        assert service.models.status == "failed"
        ready = await client.get("/readyz")
        response = await client.post("/classify", files={"file": ("a.png", png_bytes(1), "image/png")})
        health = await client.get("/healthz")
    assert health.status_code == 200
    assert ready.status_code == 503 and "pip install 'petvit[int8]'" in ready.json()["error"]["message"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


def test_int8_and_compile_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().compile is False  # off unless asked
    monkeypatch.setenv("PETVIT_DTYPE", "INT8")
    monkeypatch.setenv("PETVIT_COMPILE", "1")
    settings = Settings()
    assert settings.dtype == "int8" and settings.compile is True
    monkeypatch.setenv("PETVIT_COMPILE", "sometimes")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "PETVIT_COMPILE='sometimes': Input should be a valid boolean" in describe_invalid_settings(info.value)
    monkeypatch.setenv("PETVIT_COMPILE", "0")
    monkeypatch.setenv("PETVIT_DTYPE", "int4")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "PETVIT_DTYPE='int4'" in describe_invalid_settings(info.value) and "'int8'" in str(info.value)
