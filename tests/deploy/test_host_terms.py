"""Messages in the user's terms: under compose (PETVIT_HOST_MOUNTS, PETVIT_RUN_COMMAND, as docker-compose.yml sets
them) every container path petvit prints is the host folder and every suggested command the compose one; a folder
petvit cannot write is one line naming the owner and the fix, never a traceback."""

from __future__ import annotations

import os
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml

from cli.main import main as petvit
from model.host_paths import host_path, in_host_terms

ROOT = Path(__file__).resolve().parents[2]
NOT_FOUND = (
    "cannot load /artifacts/petvit.safetensors: no model artifact there; train one with `petvit train --out "
    "/artifacts/petvit.safetensors` or write an untrained one with `petvit export --variant ti16 --init random --out "
    "/artifacts/petvit.safetensors`. The service stays up"
)


@pytest.fixture
def under_compose(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The two variables exactly as docker-compose.yml sets them, its defaults filled in."""
    anchor = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-host-folders"]
    env = {
        "PETVIT_HOST_MOUNTS": anchor["PETVIT_HOST_MOUNTS"]
        .replace("${PETVIT_ARTIFACTS_DIR:-./artifacts}", "./artifacts")
        .replace("${PETVIT_DATA_DIR:-./data}", "./data"),
        "PETVIT_RUN_COMMAND": anchor["PETVIT_RUN_COMMAND"],
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PETVIT_HOST_MOUNTS", "PETVIT_RUN_COMMAND", "PETVIT_IN_IMAGE"):
        monkeypatch.delenv(name, raising=False)


def test_outside_compose_every_message_is_left_as_it_is(plain):
    assert in_host_terms(NOT_FOUND) == NOT_FOUND
    assert host_path("/data/torch") == "/data/torch"


def test_under_compose_prose_names_host_folders_and_commands_are_compose_runs(under_compose):
    assert under_compose["PETVIT_RUN_COMMAND"] == "docker compose run --rm train"
    text = in_host_terms(NOT_FOUND)
    assert text.startswith("cannot load ./artifacts/petvit.safetensors: no model artifact there; train one with ")
    # the commands run inside the container: their paths stay the container's
    assert "`docker compose run --rm train train --out /artifacts/petvit.safetensors`" in text
    assert (
        "`docker compose run --rm train export --variant ti16 --init random --out /artifacts/petvit.safetensors`"
        in (text)
    )
    assert "petvit" not in text.replace("petvit.safetensors", "")


def test_only_whole_container_folders_are_translated(under_compose, monkeypatch):
    monkeypatch.setenv("PETVIT_HOST_MOUNTS", "/artifacts=/home/me/my models/;/data=C:\\pets")
    text = "/data/x, /dataset, /srv/data/y, http://h/data/z, ./data/w and /artifacts/m.safetensors."
    assert in_host_terms(text) == (
        "C:\\pets/x, /dataset, /srv/data/y, http://h/data/z, ./data/w and /home/me/my models/m.safetensors."
    )
    assert host_path("/artifacts") == "/home/me/my models" and host_path("/artifactsX") == "/artifactsX"


def test_the_cli_names_the_host_folder_for_missing_imagenet_weights(under_compose, monkeypatch, tmp_path, capsys):
    """`docker compose run --rm train ...`: torchvision's weights go into TORCH_HOME=/data/torch; the message must
    say ./data/torch/hub/checkpoints/..., the folder the user has."""
    data = tmp_path / "data"
    monkeypatch.setenv("PETVIT_HOST_MOUNTS", f"/artifacts=./artifacts;{data}=./data")
    monkeypatch.setenv("TORCH_HOME", str(data / "torch"))

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for stream in ("stdout", "stderr"):  # petvit wraps them; monkeypatch puts capsys's own back afterwards
        monkeypatch.setattr(sys, stream, getattr(sys, stream))
    rc = petvit(["export", "--variant", "b16", "--init", "imagenet", "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "place it as ./data/torch/hub/checkpoints/vit_b_16-c867db91.pth" in err, err
    assert str(data) not in err


def test_a_folder_petvit_cannot_write_is_one_line_naming_the_fix(plain, monkeypatch, tmp_path, capsys):
    """The error as Path.mkdir raises it for uid 10001 in a folder of another user (faked: the tests may run as
    root, who writes anywhere), through the real `petvit export` entry point."""
    import cli.export

    target = tmp_path / "eval" / "m.safetensors"

    def refused(*args: object) -> None:
        raise PermissionError(13, "Permission denied", str(target.parent))

    monkeypatch.setattr(cli.export, "export_artifact", refused)
    monkeypatch.setattr(os, "getuid", lambda: 10001)
    rc = petvit(["export", "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    owner = tmp_path.stat().st_uid
    mode = f"{tmp_path.stat().st_mode & 0o777:o}"
    assert err == (
        f"petvit export: cannot write {target.parent}: {tmp_path} belongs to uid {owner} (mode {mode}), not uid "
        "10001: choose another output folder, or make this one writable for uid 10001\n"
    )


def test_other_os_errors_are_not_mistaken_for_permissions(plain, monkeypatch, tmp_path):
    import cli.export

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "m.safetensors"))

    monkeypatch.setattr(cli.export, "export_artifact", full)
    with pytest.raises(OSError, match="No space left"):
        petvit(["export", "--out", str(tmp_path / "m.safetensors")])


def test_a_permission_line_in_the_image_says_which_user_to_run_as(plain, monkeypatch, tmp_path):
    """As `docker run` meets it: the image's uid 10001 and a folder of uid 1000 (faked: the test cannot chown)."""
    from cli.messages import not_writable_line

    monkeypatch.setenv("PETVIT_IN_IMAGE", "1")
    folder = tmp_path / "artifacts"
    folder.mkdir()
    real_stat = Path.stat

    def stat_of_another_user(self: Path, **kwargs: object) -> os.stat_result:
        st = real_stat(self, **kwargs)
        if self != folder:
            return st
        return os.stat_result((0o40755, st.st_ino, st.st_dev, 2, 1000, 1000, 0, 0, 0, 0))

    monkeypatch.setattr(Path, "stat", stat_of_another_user)
    monkeypatch.setattr(os, "getuid", lambda: 10001)
    err = PermissionError(13, "Permission denied", str(folder / "eval"))
    line = not_writable_line(err)
    assert line == (
        f"cannot write {folder / 'eval'}: {folder} belongs to uid 1000 (mode 755), not uid 10001: "
        "run the container as the folder's owner: docker run --user 1000:1000 ..."
    )


async def test_readyz_advice_is_the_compose_command_under_compose(under_compose, tmp_path):
    from tests.app.fixtures import make_settings, running_app

    missing = Path("/artifacts/petvit.safetensors")
    async with running_app(make_settings(missing), wait_ready=False) as (client, service):
        answer = await client.get("/readyz")
        status = service.models.status
    message = answer.json()["error"]["message"]
    assert answer.status_code == 503 and status == "failed", message
    assert answer.json()["error"]["code"] == "not_ready" and answer.headers["retry-after"] == "5"
    assert message.startswith("cannot load ./artifacts/petvit.safetensors: no model artifact there"), message
    assert (
        "`docker compose run --rm train export --variant ti16 --init random --out /artifacts/petvit.safetensors`"
        in (message)
    )


async def test_readyz_advice_is_the_bare_command_elsewhere(plain, tmp_path):
    from tests.app.fixtures import make_settings, running_app

    missing = tmp_path / "petvit.safetensors"
    async with running_app(make_settings(missing), wait_ready=False) as (client, _):
        message = (await client.get("/readyz")).json()["error"]["message"]
    assert f"`petvit export --variant ti16 --init random --out {missing}`" in message
