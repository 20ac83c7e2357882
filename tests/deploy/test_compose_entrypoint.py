"""deploy/compose/entrypoint.py, the compose stack's entrypoint, without Docker: who owns the host folders, train's
train's reason, the explanation api prints, and the waiting. scripts/compose-smoke.sh runs it for real."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "compose" / "entrypoint.py"

spec = importlib.util.spec_from_file_location("compose_entrypoint", ENTRYPOINT)
entrypoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entrypoint)

# As petvit prints it under compose: in host folders (PETVIT_HOST_MOUNTS; tests/deploy/test_host_terms.py).
PETS_FAILURE = """\
  3%|▎         | 1/37 [00:01<00:40]\r 5%|▌         | 2/37 [00:02<00:39]
petvit train: Oxford-IIIT Pet is not in ./data/oxford-iiit-pet and could not be downloaded (download failed: x).
On a machine with network access download the two archives
    https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz
    https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz
and extract both into ./data/oxford-iiit-pet/ so that it holds images/*.jpg:
    mkdir -p ./data/oxford-iiit-pet && tar -xzf images.tar.gz -C ./data/oxford-iiit-pet
"""
CHECKPOINT = Path("/artifacts/petvit.safetensors")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def host(monkeypatch):
    """compose's defaults for the host folders, as docker-compose.yml passes them."""
    monkeypatch.setenv("PETVIT_HOST_MOUNTS", "/artifacts=./artifacts;/data=./data")
    return monkeypatch


# ---- train's reason, in host terms ------------------------------------------------------------------------------


def test_the_reason_is_petvits_own_message_without_progress_bars():
    reason = entrypoint.reason_from(PETS_FAILURE)
    assert reason.startswith("Oxford-IIIT Pet is not in ./data/oxford-iiit-pet")
    assert reason.endswith("tar -xzf images.tar.gz -C ./data/oxford-iiit-pet")
    assert "%|" not in reason


def test_without_petvits_message_the_reason_is_the_tracebacks_end():
    tail = "Traceback (most recent call last):\n" + "".join(f'  File "x{i}.py"\n' for i in range(30))
    tail += "PermissionError: [Errno 13] Permission denied: '/artifacts/runs'\n"
    reason = entrypoint.reason_from(tail)
    assert reason.splitlines()[-1] == "PermissionError: [Errno 13] Permission denied: '/artifacts/runs'"
    assert len(reason.splitlines()) <= 12


def test_the_reason_is_shown_as_petvit_wrote_it_never_translated_twice(host):
    """petvit writes host folders itself; a host folder that starts with /data must not become /data/pets/pets."""
    host.setenv("PETVIT_HOST_MOUNTS", "/artifacts=/artifacts/mine;/data=/data/pets")
    reason = "Oxford-IIIT Pet is not in /data/pets/oxford-iiit-pet"
    text = entrypoint.explain_failure({"state": "failed", "exit_code": 2, "reason": reason}, CHECKPOINT)
    assert f"    {reason}\n" in text
    assert "/data is /data/pets (PETVIT_DATA_DIR" in text and "/artifacts is /artifacts/mine (" in text
    assert "copy it to /artifacts/mine/petvit.safetensors" in text


# ---- the explanation ---------------------------------------------------------------------------------------------


def suggested_commands(text: str) -> list[list[str]]:
    return [shlex.split(line.strip()) for line in text.splitlines() if "docker compose" in line and ": " not in line]


def test_the_explanation_names_host_folders_and_a_route_without_training(host, petvit_args):
    failed = {"state": "failed", "exit_code": 2, "reason": entrypoint.reason_from(PETS_FAILURE)}
    text = entrypoint.explain_failure(failed, CHECKPOINT)
    assert "NOT READY" in text and "exit code 2" in text
    assert "./artifacts/petvit.safetensors does not exist" in text
    assert "extract both into ./data/oxford-iiit-pet/" in text
    assert "/data is ./data" in text and "/artifacts is ./artifacts" in text
    assert "/readyz 503" in text
    (export,) = [c for c in suggested_commands(text) if "export" in c]
    assert export[:6] == ["docker", "compose", "run", "--rm", "train", "export"]
    assert Path(petvit_args(export[5:]).out) == CHECKPOINT  # the file the api serves
    assert str(CHECKPOINT) == load_compose_checkpoint()  # the file compose's api serves by default


def load_compose_checkpoint() -> str:
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    default = "${PETVIT_ARTIFACT_FILE:-petvit.safetensors}"
    return api["environment"]["PETVIT_CHECKPOINT"].replace(default, CHECKPOINT.name)


def test_suggested_commands_carry_the_users_own_folders_and_file(host, petvit_args):
    host.setenv("PETVIT_HOST_MOUNTS", "/artifacts=/home/me/my models;/data=./data")
    mine = Path("/artifacts/my-pets.safetensors")
    text = entrypoint.explain_failure({"state": "failed", "exit_code": 2, "reason": "x"}, mine)
    (export,) = [c for c in suggested_commands(text) if "export" in c]
    assert export[:2] == ["PETVIT_ARTIFACTS_DIR=/home/me/my models", "PETVIT_ARTIFACT_FILE=my-pets.safetensors"]
    assert Path(petvit_args(export[export.index("train") + 1 :]).out) == mine
    assert "copy it to /home/me/my models/my-pets.safetensors" in text


@pytest.mark.parametrize(
    "reason",
    [
        "PermissionError: [Errno 13] Permission denied: './artifacts/runs'",  # a traceback's last line
        "cannot write ./artifacts/runs: ./artifacts belongs to uid 0 (mode 755), not uid 1000, ...",  # petvit's line
    ],
)
def test_a_permission_failure_says_who_must_be_able_to_write(host, reason):
    text = entrypoint.explain_failure({"state": "failed", "exit_code": 1, "reason": reason}, CHECKPOINT)
    assert "./artifacts/runs" in text and "must be writable" in text


# ---- train's outcome and the api's wait ---------------------------------------------------------------------------


def test_train_failure_is_recorded_with_its_reason(tmp_path, capfd):
    status = tmp_path / "train.json"
    code = "import sys; print('progress\\npetvit train: no Pets at /data/x', file=sys.stderr); sys.exit(2)"
    assert entrypoint.run_recording(["-c", code], status, program=sys.executable) == 2
    outcome = json.loads(status.read_text())
    assert (outcome["state"], outcome["exit_code"], outcome["reason"]) == ("failed", 2, "no Pets at /data/x")
    assert "petvit train: no Pets at /data/x" in capfd.readouterr().err  # passed through as it came
    assert entrypoint.run_recording(["-c", "pass"], status, program=sys.executable) == 0
    assert json.loads(status.read_text())["state"] == "succeeded"


def test_the_api_waits_for_the_artifact_or_explains_trains_failure(tmp_path, host):
    artifact, status = tmp_path / "petvit.safetensors", tmp_path / "train.json"
    artifact.write_bytes(b"x")
    assert entrypoint.wait_for_model(artifact, status, poll_s=0.01) is None
    artifact.unlink()
    entrypoint.write_status(status, "failed", exit_code=2, reason="no Pets at ./data/oxford-iiit-pet")
    assert "no Pets at ./data/oxford-iiit-pet" in entrypoint.wait_for_model(artifact, status, poll_s=0.01)
    entrypoint.write_status(status, "succeeded")
    assert "train finished, but there is no artifact" in entrypoint.wait_for_model(artifact, status, poll_s=0.01)


def test_an_artifact_placed_after_a_failed_train_is_served(tmp_path):
    """`docker compose restart api` after the export route: the old failure must not hide the new file."""
    artifact, status = tmp_path / "petvit.safetensors", tmp_path / "train.json"
    entrypoint.write_status(status, "failed", exit_code=2, reason="no Pets")
    artifact.write_bytes(b"x")
    assert entrypoint.wait_for_model(artifact, status, poll_s=0.01) is None


# ---- who owns the stack's files -----------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    """A checkout owned by an ordinary user (uid 1000), and a host uid_map as on rootful Docker."""
    checkout, uid_map = tmp_path / "checkout", tmp_path / "uid_map"
    checkout.mkdir()
    uid_map.write_text("         0          0 4294967295\n")
    return checkout, uid_map


@needs_root
def test_a_folder_docker_created_goes_to_the_checkouts_owner(tmp_path, folders):
    checkout, uid_map = folders
    os.chown(checkout, 1000, 1000)
    artifacts, data = tmp_path / "artifacts", tmp_path / "data"
    artifacts.mkdir()  # as Docker does: empty, root's
    data.mkdir()
    assert entrypoint.stack_owner(artifacts, checkout, uid_map) == (1000, 1000)
    assert entrypoint.hand_over([artifacts, data], 1000, 1000) == []
    assert {(p.stat().st_uid, p.stat().st_gid) for p in (artifacts, data)} == {(1000, 1000)}


@needs_root
def test_a_users_own_folder_decides_and_is_left_as_it_is(tmp_path, folders):
    checkout, uid_map = folders
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir(mode=0o755)
    os.chown(artifacts, 1234, 1234)
    assert entrypoint.stack_owner(artifacts, checkout, uid_map) == (1234, 1234)
    (artifacts / "model.safetensors").write_bytes(b"x")
    root_owned = tmp_path / "root-data"
    root_owned.mkdir(mode=0o755)
    (root_owned / "keep").write_text("not empty: not Docker's doing")
    (warning,) = entrypoint.hand_over([artifacts, root_owned], 1234, 1234)
    assert "is not writable by uid 1234" in warning and "sudo chown -R 1234:1234" in warning
    assert root_owned.stat().st_uid == 0 and artifacts.stat().st_uid == 1234


@needs_root
def test_root_owned_means_the_images_user_except_under_rootless_docker(tmp_path, folders):
    checkout, uid_map = folders  # root's checkout (tmp_path is root's)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    assert entrypoint.stack_owner(artifacts, checkout, uid_map) == (entrypoint.IMAGE_UID, entrypoint.IMAGE_UID)
    uid_map.write_text("0 1000 1\n1 100000 65536\n")  # rootless: our root is an ordinary user outside
    assert entrypoint.stack_owner(artifacts, checkout, uid_map) == (0, 0)


def test_writable_by_reads_the_mode_bits_as_that_user_would(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir(mode=0o755)
    st = folder.stat()
    assert entrypoint.writable_by(folder, st.st_uid, st.st_gid) or st.st_uid == 0
    assert not entrypoint.writable_by(folder, st.st_uid + 4242, st.st_gid + 4242)
    folder.chmod(0o777)
    assert entrypoint.writable_by(folder, st.st_uid + 4242, st.st_gid + 4242)


def test_an_unknown_role_prints_the_usage(capsys):
    assert entrypoint.main(["serve"]) == 2
    assert "prepare|as-owner|after-train" in capsys.readouterr().out
