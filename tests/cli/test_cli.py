"""`petvit predict` on a saved photo, and `petvit classify` against a live uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.client import AsyncPetvitClient, PetvitClient, PetvitError, wait_until_ready
from cli.main import main as petvit
from tests.app.fixtures import direct_probs, live_server, make_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def chelsea_jpeg(tmp_path: Path, chelsea: Image.Image) -> Path:
    path = tmp_path / "chelsea.jpg"
    chelsea.save(path, quality=90)
    return path


@pytest.fixture
def live_url(tiny_artifact: Path) -> Iterator[str]:
    with live_server(make_settings(tiny_artifact), ready_timeout_s=10) as url:
        yield url


def test_predict_prints_the_models_top_k_and_writes_a_heatmap(chelsea_jpeg, tiny_artifact, tmp_path, capsys):
    out = tmp_path / "maps" / "chelsea-heat.png"
    code = petvit(
        [
            "predict",
            str(chelsea_jpeg),
            "--top-k",
            "3",
            "--checkpoint",
            str(tiny_artifact),
            "--heatmap",
            str(out),
            "--json",
            "--dtype",
            "float32",  # held to the float32 model's own scores below
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    [answer] = json.loads(printed[: printed.rindex("]") + 1])
    expected = direct_probs(tiny_artifact, chelsea_jpeg.read_bytes())
    scores, indices = torch.topk(expected, 3)
    assert [p["index"] for p in answer["predictions"]] == indices.tolist()
    assert [p["score"] for p in answer["predictions"]] == pytest.approx(scores.tolist(), abs=1e-5)
    # A person looks at this file: the photo with the overlay composed over it, not the overlay alone.
    picture = Image.open(out)
    assert picture.size == (451, 300) and picture.mode == "RGB"
    photo = np.asarray(Image.open(chelsea_jpeg).convert("RGB"), dtype=float)
    shown = np.asarray(picture, dtype=float)
    # Left of the crop (x < 95 for this artifact's 37 -> 32 crop): the photo under the veil, 45% of its brightness.
    assert shown[:, :90].mean() == pytest.approx(0.45 * photo[:, :90].mean(), abs=3)
    assert shown[:, :90].std() > 5  # the photo's texture, not a flat fill
    assert "untrained" in printed


def test_predict_classifies_without_the_service_package(chelsea_jpeg, tiny_artifact):
    """`petvit predict` answers through the model library: importing it loads nothing from app/, and running it
    loads only the settings (app.config), never the service's routes, batcher or lifecycle."""
    code = f"""
import sys
import cli.predict
print("on import:", sorted(m for m in sys.modules if m == "app" or m.startswith("app.")))
from cli.main import main
status = main(["predict", {str(chelsea_jpeg)!r}, "--checkpoint", {str(tiny_artifact)!r}, "--json"])
print("status:", status)
print("on run:", sorted(m for m in sys.modules if m == "app" or m.startswith("app.")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "on import: []" in result.stdout
    assert "status: 0" in result.stdout
    assert "on run: ['app', 'app.config']" in result.stdout


def test_predict_serves_int8_and_training_refuses_it(chelsea_jpeg, tiny_artifact, capsys):
    argv = ["predict", str(chelsea_jpeg), "--checkpoint", str(tiny_artifact), "--json", "--top-k", "37"]
    assert petvit([*argv, "--dtype", "int8"]) == 0
    printed = capsys.readouterr().out
    [answer] = json.loads(printed[: printed.rindex("]") + 1])
    scores = torch.zeros(37)
    for p in answer["predictions"]:
        scores[p["index"]] = p["score"]
    assert (scores - direct_probs(tiny_artifact, chelsea_jpeg.read_bytes())).abs().max() < 0.02
    with pytest.raises(SystemExit) as exit:  # int8 is for inference only: argparse lists what training accepts
        petvit(["train", "--dtype", "int8"])
    assert exit.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    # An int8 model has no gradients to roll out: one line saying what to use instead, not a traceback
    assert petvit([*argv[:-2], "--dtype", "int8", "--heatmap", str(chelsea_jpeg.parent / "map.png"),
                   "--heatmap-method", "gradient"]) == 2  # fmt: skip
    said = capsys.readouterr().out
    assert said.startswith("petvit predict: --heatmap-method gradient needs gradients") and "Traceback" not in said
    assert "--heatmap-method rollout" in said and not (chelsea_jpeg.parent / "map.png").exists()


def test_predict_draws_the_heatmap_method_asked_for(chelsea_jpeg, tiny_artifact, tmp_path, capsys):
    pictures = {}
    for method in ("rollout", "gradient"):
        out = tmp_path / f"{method}.png"
        argv = ["predict", str(chelsea_jpeg), "--checkpoint", str(tiny_artifact), "--dtype", "float32",
                "--heatmap", str(out), "--heatmap-method", method]  # fmt: skip
        assert petvit(argv) == 0
        pictures[method] = np.asarray(Image.open(out), dtype=float)
    assert np.abs(pictures["rollout"] - pictures["gradient"]).mean() > 1  # two different maps over the same photo
    with pytest.raises(SystemExit) as exit_info:
        petvit(["predict", str(chelsea_jpeg), "--heatmap-method", "lrp"])
    assert exit_info.value.code == 2 and "invalid choice: 'lrp'" in capsys.readouterr().err


def test_predict_reports_a_missing_artifact(chelsea_jpeg, tmp_path, capsys):
    assert petvit(["predict", str(chelsea_jpeg), "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "petvit export" in capsys.readouterr().out


def test_classify_against_a_live_server(live_url, chelsea_jpeg, tiny_artifact, capsys):
    assert petvit(["classify", "--url", live_url, str(chelsea_jpeg), str(chelsea_jpeg), "--top-k", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = torch.topk(direct_probs(tiny_artifact, chelsea_jpeg.read_bytes()), 2).indices.tolist()
    assert [[p["index"] for p in r["predictions"]] for r in answer["results"]] == [expected, expected]

    with PetvitClient(live_url) as client:
        assert client.ready() and client.model()["name"] == "petvit-tiny-test"
        with pytest.raises(PetvitError) as info:
            client.classify([b"not an image"])
    assert info.value.status == 400 and info.value.code == "undecodable_image"


async def test_async_client_classifies_concurrently_and_raises_structured_errors(live_url, chelsea_jpeg, tiny_artifact):
    expected = torch.topk(direct_probs(tiny_artifact, chelsea_jpeg.read_bytes()), 3)
    async with AsyncPetvitClient(live_url) as client:
        assert await client.ready() and (await client.model())["name"] == "petvit-tiny-test"
        answers = await asyncio.gather(*(client.classify([chelsea_jpeg], top_k=3, heatmap=True) for _ in range(4)))
        with pytest.raises(PetvitError) as info:
            await client.classify([b"not an image"])
    for answer in answers:
        (result,) = answer["results"]
        assert [p["index"] for p in result["predictions"]] == expected.indices.tolist()
        np.testing.assert_allclose([p["score"] for p in result["predictions"]], expected.values.numpy(), rtol=1e-4)
        assert len(result["heatmap"]["grid"]) == 4  # tiny model: 32 px / 8 px patches
    assert info.value.status == 400 and info.value.code == "undecodable_image"


def test_client_asks_for_a_heatmap_method(live_url, chelsea_jpeg):
    with PetvitClient(live_url) as client:
        answer = client.classify([chelsea_jpeg], heatmap=True, heatmap_method="gradient")
        assert answer["results"][0]["heatmap"]["method"] == "gradient"
        with pytest.raises(PetvitError) as info:
            client.classify([chelsea_jpeg], heatmap=True, heatmap_method="lrp")
    assert info.value.status == 422 and "'rollout' or 'gradient'" in info.value.message


def test_classify_says_when_the_server_is_unreachable(chelsea_jpeg, capsys):
    assert petvit(["classify", "--url", "http://127.0.0.1:9", str(chelsea_jpeg)]) == 2
    assert "could not reach" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["serve", "--port", "9"], ["predict", "x.jpg"]])
def test_invalid_settings_are_named_as_environment_variables_without_a_traceback(command, monkeypatch, capsys):
    monkeypatch.setenv("PETVIT_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("PETVIT_DEVICE", "tpu")
    monkeypatch.setenv("PETVIT_LOG_LEVEL", "verbose")  # was accepted, then logging.basicConfig raised
    assert petvit(command) == 2
    printed = capsys.readouterr().err
    assert "PETVIT_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1" in printed
    assert "PETVIT_DEVICE='tpu'" in printed and "PETVIT_LOG_LEVEL='verbose'" in printed


def test_wait_until_ready_is_true_for_a_ready_service(live_url):
    assert wait_until_ready(live_url, timeout=1) is True


def test_wait_until_ready_gives_up_on_timeout_and_when_the_server_died():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    assert wait_until_ready(url, timeout=0.3, interval=0.05) is False
    assert 0.3 <= time.monotonic() - start < 3
    calls = []
    assert wait_until_ready(url, timeout=60, still_running=lambda: calls.append(1) is None and len(calls) < 3) is False
    assert len(calls) == 3  # stopped polling as soon as the server was reported dead, long before the timeout


def test_predict_says_no_pet_recognised_as_the_service_decides(open_set_digits, tmp_path, monkeypatch, capsys):
    """The digits 0-4 artifact (tests/conftest.py) on a digit it never learned, with the threshold set so low that
    anything is unknown, then on the tiny artifact, which has no open set: `unknown` null."""
    path = tmp_path / "digit.png"
    Image.fromarray(open_set_digits.unseen_images[0].permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)
    monkeypatch.setenv("PETVIT_UNKNOWN_THRESHOLD", "-1")
    assert petvit(["predict", str(path), "--checkpoint", str(open_set_digits.artifact), "--dtype", "float32"]) == 0
    assert "no pet recognised (open-set score" in capsys.readouterr().out
    argv = ["predict", str(path), "--checkpoint", str(open_set_digits.artifact), "--dtype", "float32", "--json"]
    assert petvit(argv) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["unknown"] is True and answer["ood_score"] > -1
    monkeypatch.delenv("PETVIT_UNKNOWN_THRESHOLD")
    assert petvit(argv) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["unknown"] is (answer["ood_score"] > open_set_digits.fields["open_set"].threshold)
