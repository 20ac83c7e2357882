"""POST /v1/admin/reload loads only from the model folders (app/reload.py: checked_checkpoint), and no answer quotes
a file it read: the admin key changes the model, it does not read the server's files."""

from __future__ import annotations

import logging
import shutil
import struct
from pathlib import Path

import pytest

from app.config import Settings
from app.errors import checkpoint_not_allowed
from app.reload import model_folders
from model.artifact import file_sha256, save_artifact
from tests.conftest import make_tiny_model

from .fixtures import make_settings, metric_value, png_bytes, running_app

KEY = "s3cret-admin"
ADMIN = {"X-Admin-Key": KEY}


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_artifact(make_tiny_model(seed=1), path, {"name": "petvit-tiny-other", "variant": "tiny"})
    return path


@pytest.fixture
def layout(tmp_path: Path, tiny_artifact: Path, other_artifact: Path, monkeypatch) -> tuple[Path, Path]:
    """models/ (the served artifact, a link out of it to a file and one to a folder) and outside/ (a valid
    artifact, so that only the path can be why it is refused); the working directory is models/."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    shutil.copy(tiny_artifact, models / "petvit.safetensors")
    shutil.copy(other_artifact, outside / "other.safetensors")
    (models / "link.safetensors").symlink_to(outside / "other.safetensors")
    (models / "sub").symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(models)  # relative paths are read from here, as PETVIT_CHECKPOINT's would be
    return models, outside


def reloads(service, outcome: str) -> float:
    return metric_value(service, "petvit_reloads_total", outcome=outcome)


async def post_reload(client, checkpoint: str):
    return await client.post("/v1/admin/reload", json={"checkpoint": checkpoint}, headers=ADMIN)


async def test_paths_outside_the_model_folders_get_403_naming_them_and_the_model_keeps_serving(layout):
    models, outside = layout
    refused = [
        "/etc/passwd",
        "../../etc/hostname",
        "/proc/self/environ",
        str(outside / "other.safetensors"),  # absolute, to a valid artifact
        "../outside/other.safetensors",  # relative, with ..
        str(models / ".." / "outside" / "other.safetensors"),  # absolute, with ..
        "link.safetensors",  # a symlink in the folder to a file out of it
        str(models / "sub" / "other.safetensors"),  # through a symlinked folder
        "petvit.safetensors\x00.txt",  # no file can have this name
    ]
    settings = make_settings(models / "petvit.safetensors", admin_key=KEY)
    async with running_app(settings) as (client, service):
        served = service.models.predictor.sha256
        for checkpoint in refused:
            r = await post_reload(client, checkpoint)
            assert r.status_code == 403, (checkpoint, r.text)
            error = r.json()["error"]
            # exactly the path as sent and the folder: nothing read from the file, not even whether it exists
            assert error == {
                "code": "checkpoint_not_allowed",
                "message": checkpoint_not_allowed(checkpoint, [models]).message,
            }
            assert str(models) in error["message"] and "PETVIT_MODEL_DIRS" in error["message"]
            answer = await client.post("/classify", content=png_bytes(0), headers={"Content-Type": "image/png"})
            assert answer.status_code == 200 and answer.json()["model_sha256"] == served
        assert reloads(service, "forbidden") == len(refused)
        assert reloads(service, "refused") == reloads(service, "success") == 0
        assert (await client.get("/v1/model")).json()["checkpoint"] == str(models / "petvit.safetensors")


async def test_paths_inside_the_folders_reload_and_model_dirs_adds_folders(layout, other_artifact):
    models, outside = layout
    shutil.copy(other_artifact, models / "v2.safetensors")
    (models / "current.safetensors").symlink_to(models / "v2.safetensors")  # a link that stays inside
    (models / "old").mkdir()
    settings = make_settings(models / "petvit.safetensors", admin_key=KEY, warmup="none")
    async with running_app(settings) as (client, service):
        for checkpoint in ("old/../v2.safetensors", "current.safetensors", str(models / "petvit.safetensors")):
            r = await post_reload(client, checkpoint)
            assert r.status_code == 200, (checkpoint, r.text)
            assert r.json()["checkpoint"] == str((models / checkpoint).resolve())  # the file it read, links followed
    # PETVIT_MODEL_DIRS adds outside/: the file there, and the link to it, now load
    settings = make_settings(models / "petvit.safetensors", admin_key=KEY, warmup="none", model_dirs=[outside])
    async with running_app(settings) as (client, service):
        for checkpoint in (str(outside / "other.safetensors"), "link.safetensors"):
            r = await post_reload(client, checkpoint)
            assert r.status_code == 200 and r.json()["sha256"] == file_sha256(outside / "other.safetensors"), r.text
        assert reloads(service, "success") == 2 and reloads(service, "forbidden") == 0
        r = await post_reload(client, "/etc/passwd")
        assert r.status_code == 403 and f"({models}, {outside})" in r.json()["error"]["message"]


async def test_the_configured_checkpoint_reloads_even_where_it_links_out_of_its_folder(layout, tiny_artifact):
    """PETVIT_CHECKPOINT is the operator's choice: the no-body reload (and SIGHUP) and the same path sent as
    `checkpoint` load it wherever it points; its link target's folder is not a model folder for that."""
    models, outside = layout
    shutil.copy(tiny_artifact, outside / "more.safetensors")
    settings = make_settings(models / "link.safetensors", admin_key=KEY, warmup="none")  # -> outside/other
    async with running_app(settings) as (client, service):
        assert (await client.post("/v1/admin/reload", headers=ADMIN)).status_code == 200
        assert (await post_reload(client, str(models / "link.safetensors"))).status_code == 200
        assert (await post_reload(client, str(outside / "more.safetensors"))).status_code == 403
        assert (reloads(service, "success"), reloads(service, "forbidden")) == (2, 1)


async def test_files_inside_that_are_not_artifacts_are_refused_without_quoting_them(layout, caplog):
    models, _ = layout
    text = models / "notes.safetensors"
    text.write_bytes(b"password=hunter2\nroot:x:0:0\n")
    text_length = struct.unpack("<Q", text.read_bytes()[:8])[0]  # what the old message printed
    short = models / "short.safetensors"
    short.write_bytes(struct.pack("<Q", 4242) + b"x" * 10)  # a plausible length, longer than the file
    not_json = models / "bytes.safetensors"
    not_json.write_bytes(struct.pack("<Q", 4) + b"\x80\x81{}")  # the JSON parser's message would quote 0x80
    (models / "folder.safetensors").mkdir()
    keeps = "; the current model keeps serving"
    what = "; petvit loads the .safetensors files `petvit train`, `petvit export` and `petvit import` write"
    expected = {
        text: f"{text} is not a safetensors file: it does not start with a header length{what}{keeps}",
        short: f"{short} is truncated or not a safetensors file: the header length it starts with runs past its end "
        f"(18 bytes); copy or download it again{keeps}",
        not_json: f"{not_json} is not a safetensors file: its header is not JSON{what}{keeps}",
    }
    cannot = "no file this service can read is there (missing, a folder, or not readable by its user)"
    for name in ("missing.safetensors", "folder.safetensors"):  # the same words: which of them is the log's
        expected[models / name] = f"cannot load {models / name}: {cannot}{keeps}"
    caplog.set_level(logging.DEBUG)
    async with running_app(make_settings(models / "petvit.safetensors", admin_key=KEY)) as (client, service):
        served = service.models.predictor.sha256
        for path, message in expected.items():
            r = await post_reload(client, path.name)
            assert r.status_code == 422 and r.json()["error"] == {"code": "invalid_artifact", "message": message}
        assert reloads(service, "refused") == len(expected) and service.models.predictor.sha256 == served
    logged = "\n".join(record.getMessage() for record in caplog.records).replace(str(models), "")
    for secret in (str(text_length), "hunter2", "4242", "4250", "0x80"):  # in no answer, in no log line
        assert secret not in logged, secret
    assert "is not JSON (UnicodeDecodeError at offset 0" in logged  # the DEBUG log says where, never what
    assert "Is a directory" in logged and "no model artifact there" in logged  # which "cannot load" it was


def test_model_dirs_are_read_from_the_environment_and_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("PETVIT_CHECKPOINT", str(tmp_path / "a" / "petvit.safetensors"))
    monkeypatch.setenv("PETVIT_MODEL_DIRS", f" {tmp_path / 'b'} ,, {tmp_path / 'a' / 'x' / '..'},")
    settings = Settings()
    assert settings.model_dirs == [tmp_path / "b", tmp_path / "a" / "x" / ".."]
    assert model_folders(settings) == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]  # once each
    assert model_folders(Settings(checkpoint=Path("m.safetensors"), model_dirs=[])) == [Path.cwd().resolve()]
