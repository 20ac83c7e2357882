"""docker-compose.yml's entrypoint around `petvit`: host folders with the right owner, and a first run that explains
itself in `docker compose up`'s own output.

compose mounts this folder read-only at /compose and runs the image through this script in three roles:

  prepare          one-shot, as root, before train and api: hand the folders Docker created for the bind mounts
                   (./artifacts, ./data) to the stack's owner, and forget the last run's train outcome. It never
                   fails: a failed dependency would stop `up` with compose's bare "exited with code 1", and
                   whatever it could not fix shows up, explained, through train below.
  as-owner ARGS    as root only long enough to switch to the stack's owner, then `petvit ARGS`. For `train` it also
                   records the outcome, and the reason when there is one, where api can read it.
  after-train ARGS as root only long enough to switch to the stack's owner too; wait until the artifact exists or
                   train has failed; on failure print train's reason (in host folders: under compose petvit
                   writes its messages so, see PETVIT_HOST_MOUNTS) and the ways forward; then `petvit ARGS`
                   (serve), which answers /healthz 200 and /readyz 503 until it has a model.

The stack's owner is the owner of the artifacts folder, or, when Docker has just created that folder (empty and
root-owned: what Docker does with a missing bind-mount source), the owner of the checkout this file lives in; and
when that is root, the image's own user (uid 10001) instead, so petvit never runs as the host's root. So what train
writes belongs to the person who runs compose, what they put into ./data or ./artifacts is theirs to change, and
api reads both, with no chmod. Kubernetes and `docker run` never use this file: there the image's user applies.

Standard library only: it runs on the image's Python before anything of petvit is imported.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ARTIFACTS = Path("/artifacts")
DATA = Path("/data")
STATUS_DIR = Path("/status")  # a named volume shared by train (writes) and api (reads)
CHECKOUT = Path("/compose")  # this folder, bind-mounted from the checkout
IMAGE_UID = 10001  # the image's `petvit` user
# Each container folder: the compose variable the user sets for its host folder, and compose's default for it.
# compose passes the host folders in as PETVIT_HOST_MOUNTS ("/artifacts=./artifacts;/data=./data", from its own
# volume lines); petvit reads the same variable and prints its own messages in host terms (model/host_paths.py).
HOST_FOLDERS = {
    "/artifacts": ("PETVIT_ARTIFACTS_DIR", "./artifacts"),
    "/data": ("PETVIT_DATA_DIR", "./data"),
}
DEFAULT_ARTIFACT_FILE = "petvit.safetensors"
RULE = "=" * 100


def say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


# ---- who owns the stack's files --------------------------------------------------------------------------------


def docker_made(folder: Path) -> bool:
    """Docker creates a missing bind-mount source as an empty folder owned by root."""
    return folder.stat().st_uid == 0 and not any(folder.iterdir())


def stack_owner(
    artifacts: Path = ARTIFACTS, checkout: Path = CHECKOUT, uid_map: Path = Path("/proc/self/uid_map")
) -> tuple[int, int]:
    """uid:gid that train and api run as. When that would be root, the image's own user instead: petvit never
    runs as the host's root (rootless Docker excepted, where the container's root is the user who runs it)."""
    source = checkout if docker_made(artifacts) else artifacts
    st = source.stat()
    if st.st_uid == 0 and container_root_is_host_root(uid_map):
        return IMAGE_UID, IMAGE_UID
    return st.st_uid, st.st_gid


def container_root_is_host_root(uid_map: Path) -> bool:
    """False under rootless Docker (or a user namespace), where uid 0 here maps to an ordinary uid outside."""
    try:
        return uid_map.read_text().split()[:2] == ["0", "0"]
    except (OSError, IndexError):
        return True


def writable_by(folder: Path, uid: int, gid: int) -> bool:
    """From the mode bits, as uid:gid would see them (root's own access() would always say yes)."""
    st = folder.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & 0o200)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o020)
    return bool(st.st_mode & 0o002)


def hand_over(folders: list[Path], uid: int, gid: int) -> list[str]:
    """Give Docker-created folders to uid:gid; return a warning for each folder uid:gid still cannot write."""
    warnings = []
    for folder in folders:
        if not folder.is_dir():
            continue
        if docker_made(folder) and uid != 0:
            try:
                os.chown(folder, uid, gid)
            except OSError as err:  # e.g. a file system that keeps its own owners
                warnings.append(f"could not give {host_path(str(folder))} to uid {uid}: {err}")
                continue
        if not writable_by(folder, uid, gid):
            st = folder.stat()
            warnings.append(
                f"{host_path(str(folder))} belongs to uid {st.st_uid} and is not writable by uid {uid}, who runs "
                f"train: it can read what is there, not write. Fix: sudo chown -R {uid}:{gid} {host_path(str(folder))}"
            )
    return warnings


def own_status_dir(uid: int, gid: int) -> None:
    """The status volume is the stack's own: train (as uid:gid) writes there, api (the same user) reads."""
    if STATUS_DIR.is_dir() and os.getuid() == 0:
        os.chown(STATUS_DIR, uid, gid)
        os.chmod(STATUS_DIR, 0o755)


def become(uid: int, gid: int) -> None:
    """Drop root for uid:gid (the stack's owner); a no-op when not root or when the owner is root."""
    if os.getuid() != 0 or uid == 0:  # not root, or rootless Docker's root (see stack_owner)
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if uid != IMAGE_UID:
        os.environ["HOME"] = "/tmp"  # /home/petvit belongs to the image's user


# ---- host paths -------------------------------------------------------------------------------------------------


def host_folder(inside: str) -> str:
    mounts = dict(pair.partition("=")[::2] for pair in os.environ.get("PETVIT_HOST_MOUNTS", "").split(";"))
    return (mounts.get(inside) or HOST_FOLDERS[inside][1]).rstrip("/") or "/"


def host_path(path: str) -> str:
    """/data/oxford-iiit-pet -> ./data/oxford-iiit-pet (or wherever PETVIT_DATA_DIR points)."""
    for inside in HOST_FOLDERS:
        if path == inside or path.startswith(inside + "/"):
            return host_folder(inside) + path[len(inside) :]
    return path


def env_prefix(checkpoint: Path) -> str:
    """The compose variables the user set, so that a suggested command finds the same folders and file."""
    settings = [(variable, host_folder(inside), default) for inside, (variable, default) in HOST_FOLDERS.items()]
    settings.append(("PETVIT_ARTIFACT_FILE", checkpoint.name, DEFAULT_ARTIFACT_FILE))
    return "".join(f"{name}={shlex.quote(value)} " for name, value, default in settings if value != default)


# ---- train's outcome ---------------------------------------------------------------------------------------------


def reason_from(stderr_tail: str) -> str:
    """What went wrong, from the end of train's stderr: petvit's own `petvit train: ...` message when it printed
    one (missing data or weights, bad settings), else the last lines (a traceback's last lines say the most)."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in stderr_tail.splitlines()]  # progress bars redraw with \r
    starts = [i for i, line in enumerate(lines) if line.startswith("petvit train: ")]
    chosen = lines[starts[-1] :] if starts else [line for line in lines if line.strip()][-12:]
    text = "\n".join(chosen).strip()
    return text.removeprefix("petvit train: ") or "(train printed nothing on stderr)"


def write_status(path: Path, state: str, **fields: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"state": state, "at": time.time(), **fields}))
    os.replace(tmp, path)  # api never reads half a file


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_recording(argv: list[str], status: Path, program: str = "petvit") -> int:
    """`petvit ARGV` with stderr passed through as it comes (progress bars included) and its tail kept; the outcome
    goes to `status`. SIGTERM/SIGINT reach train, so `docker compose stop` stops it at once."""
    child = subprocess.Popen([program, *argv], stderr=subprocess.PIPE)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    tail = b""
    while chunk := os.read(child.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-32768:]
    rc = child.wait()
    if rc == 0:
        write_status(status, "succeeded")
        return 0
    reason = reason_from(tail.decode(errors="replace"))
    if rc < 0:
        name = signal.Signals(-rc).name
        reason += f"\n(train was killed by {name}" + (": out of memory? give Docker more)" if rc == -9 else ")")
    write_status(status, "failed", exit_code=rc, reason=reason)
    return rc if rc > 0 else 128 - rc


# ---- the explanation ----------------------------------------------------------------------------------------------


def explain_failure(status: dict, checkpoint: Path) -> str:
    # Already in host terms: petvit prints its messages so under compose. Translating again would turn a host
    # folder that itself starts with /data (PETVIT_DATA_DIR=/data/pets) into /data/pets/pets.
    reason = str(status.get("reason", "")).strip()
    file_on_host = host_path(str(checkpoint))
    prefix = env_prefix(checkpoint)
    lines = [
        RULE,
        f"petvit: NOT READY - there is no model to serve: {file_on_host} does not exist, and",
        f"`train` could not make one (exit code {status.get('exit_code')}). Its reason, in this machine's folders:",
        "",
        *("    " + line for line in reason.splitlines()),
        "",
    ]
    if any(words in reason for words in ("Permission denied", "Read-only file system", "cannot write")):
        lines += [
            "train runs as the owner of the artifacts folder (or of this checkout when Docker created that folder);",
            "the folder above must be writable by that user. `ls -ln` shows who owns it.",
            "",
        ]
    lines += [
        f"Host folders: /data is {host_folder('/data')} (PETVIT_DATA_DIR; Pets and the torch weights cache),",
        f"              /artifacts is {host_folder('/artifacts')} (PETVIT_ARTIFACTS_DIR; the model).",
        "Relative folders are relative to the folder holding docker-compose.yml.",
        "",
        "What next:",
        f"  - put the files where the reason says, then stop this (Ctrl-C) and run: {prefix}docker compose up",
        f"  - or serve an artifact you already have: copy it to {file_on_host}, then: docker compose restart api",
        "  - or try the stack with an untrained model (random weights, meaningless labels):",
        f"      {prefix}docker compose run --rm train export --variant ti16 --init random --out {checkpoint}",
        "      docker compose restart api",
        "  (docs/deploy.md: 'Serving an artifact you already have (no training)')",
        "Meanwhile the api stays up: GET /healthz answers 200, GET /readyz 503 naming what is missing.",
        RULE,
    ]
    return "\n".join(lines)


def explain_missing(checkpoint: Path) -> str:
    return "\n".join(
        [
            RULE,
            f"petvit: NOT READY - train finished, but there is no artifact at {host_path(str(checkpoint))}.",
            "train writes /artifacts/$PETVIT_ARTIFACT_FILE and the api serves the same name: check that nothing else",
            "moved or renamed it, then: docker compose restart api",
            RULE,
        ]
    )


def wait_for_model(checkpoint: Path, status: Path, poll_s: float = 1.0, note_every_s: float = 300.0) -> str | None:
    """None once the artifact exists; else the explanation, once train has finished without writing it."""
    started = last_note = time.monotonic()
    while not checkpoint.exists():
        outcome = read_status(status)
        if outcome and outcome.get("state") == "failed":
            return explain_failure(outcome, checkpoint)
        if outcome and outcome.get("state") == "succeeded":
            return explain_missing(checkpoint)
        if time.monotonic() - last_note >= note_every_s:
            minutes = (time.monotonic() - started) / 60
            say(f"petvit: waiting {minutes:.0f} min for train to write {host_path(str(checkpoint))} (its log: train)")
            last_note = time.monotonic()
        time.sleep(poll_s)
    return None


# ---- the three roles ------------------------------------------------------------------------------------------------


def prepare() -> int:
    try:
        uid, gid = stack_owner()
        (STATUS_DIR / "train.json").unlink(missing_ok=True)  # api must not read the last run's outcome
        own_status_dir(uid, gid)
        warnings = hand_over([ARTIFACTS, DATA], uid, gid)
    except OSError as err:
        say(f"petvit prepare: {err} (continuing: train will say what it cannot do)")
        return 0
    say(
        f"petvit prepare: train runs as uid {uid}:{gid}; model in {host_folder('/artifacts')}, "
        f"data in {host_folder('/data')}"
    )
    for warning in warnings:
        say(f"petvit prepare: WARNING {warning}")
    return 0


def as_owner(argv: list[str]) -> int:
    uid, gid = stack_owner()
    if os.getuid() == 0:  # also without prepare (`run --no-deps`)
        hand_over([ARTIFACTS, DATA], uid, gid)
        own_status_dir(uid, gid)
    become(uid, gid)
    argv = zero_shot_instead(argv)
    if argv[:1] in (["train"], ["import"]) and STATUS_DIR.is_dir():
        return run_recording(argv, STATUS_DIR / "train.json")
    os.execvp("petvit", ["petvit", *argv])
    return 127  # not reached


def zero_shot_instead(argv: list[str]) -> list[str]:
    """PETVIT_ZERO_SHOT=SOURCE (a CLIP checkpoint, e.g. hf-hub:openai/clip-vit-base-patch16): train's artifact comes
    from `petvit import SOURCE --zero-shot pets` instead (docs/models.md), no Pets download and no training; the hub
    cache lives in /data/huggingface, so a cache filled elsewhere works offline. An existing artifact is kept."""
    source = os.environ.get("PETVIT_ZERO_SHOT", "").strip()
    if argv[:1] != ["train"] or not source or "--out" not in argv or Path(argv[argv.index("--out") + 1]).exists():
        return argv
    os.environ.setdefault("HF_HOME", str(DATA / "huggingface"))
    return ["import", source, "--zero-shot", "pets", "--out", argv[argv.index("--out") + 1]]


def after_train(argv: list[str]) -> int:
    # Without `init: true`, PID 1 ignores SIGTERM unless handled: `docker compose stop` must not wait 10 s.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    # The same user as train, who can read what train wrote and what you copied in, whatever its mode.
    owner = stack_owner()
    if cache := os.environ.get("PETVIT_COMPILE_CACHE_DIR"):  # the compile-cache volume, created root-owned by Docker
        hand_over([Path(cache)], *owner)
    become(*owner)
    checkpoint = Path(os.environ.get("PETVIT_CHECKPOINT", str(ARTIFACTS / DEFAULT_ARTIFACT_FILE)))
    explanation = wait_for_model(checkpoint, STATUS_DIR / "train.json")
    if explanation:
        say(explanation)
    elif not os.access(checkpoint, os.R_OK):
        say(f"petvit: {host_path(str(checkpoint))} is not readable by uid {os.getuid()}: chmod a+r it")
    os.execvp("petvit", ["petvit", *argv])
    return 127  # not reached


def main(argv: list[str]) -> int:
    roles = {"prepare": lambda _: prepare(), "as-owner": as_owner, "after-train": after_train}
    if not argv or argv[0] not in roles:
        say(f"usage: entrypoint.py {{{'|'.join(roles)}}} [petvit arguments]")
        return 2
    return roles[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
