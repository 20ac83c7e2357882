"""Every shell command README.md and docs/*.md show is either run here, in document order in a scratch folder (so
docs and behaviour cannot drift apart), or listed below as needing what a test cannot have in seconds: Docker, a
cluster, a network, a GPU, a running service, your own files, or minutes to hours. A command that fits no entry of
the list is run, so a new one cannot slip past: it passes or it gets a reason here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"bash", "sh", "shell", "console"}
# An untagged block is a shell block when its first line starts like a command (others are trees, logs, output).
COMMAND_START = re.compile(r"^(petvit|curl|mkdir|tar|docker|kubectl|python3?|\.venv/bin/|[A-Z_]+=\S* )")

# (pattern, why it is not run here). Each entry must still match a command in the docs (test below).
NOT_RUN: list[tuple[str, str]] = [
    (
        r"^([A-Z_]+=\S+ )*(docker|docker-compose)\b",
        "needs a Docker engine; scripts/compose-smoke.sh runs compose's own commands",
    ),
    (r"^(kubectl|kustomize)\b|kustomize edit", "needs a Kubernetes cluster (tests/deploy renders the manifests)"),
    (r"localhost:\d+|localhost/", "needs a running service (tests/app and the smoke test call these routes)"),
    (r"^PETVIT_\w+=\S+ petvit serve|petvit serve\b", "starts a server that runs until stopped"),
    (r"^kill -HUP <pid>", "needs the pid of a running service"),
    (r"^curl -LO https://", "downloads Oxford-IIIT Pet from the internet"),
    (r"^tar -xzf (images|annotations)\.tar\.gz", "needs the downloaded Pets archives"),
    (r"petvit import hf-hub:|\bhf download\b|pip install", "needs the network (Hugging Face Hub, a package index)"),
    (r"petvit train\b|^torchrun\b", "trains: minutes to hours (tests/training runs every recipe on tiny data)"),
    (r"petvit evaluate\b", "needs Oxford-IIIT Pet or a trained artifact (tests/training runs evaluate on digits)"),
    (r"petvit (classify|predict) cat\.jpg|petvit classify --url", "needs your photos and a model or a service"),
    (r"~/Downloads/|~/not-pets|\$PWD/my-pets|\./my-clip\b", "needs your own files (a downloaded checkpoint)"),
    (r"bench/\w+\.py", "a benchmark: minutes of CPU (its figures are in the docs it writes)"),
    (r"-m pytest tests/ui", "the browser test, part of this suite already"),
]


def shell_blocks() -> list[tuple[str, list[str]]]:
    """(document, its command lines), block by block in document order; continuation lines joined."""
    blocks = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            lines = [line.strip() for line in body.replace("\\\n", " ").splitlines()]
            lines = [line for line in lines if line and not line.startswith("#")]
            if tag in SHELL_TAGS or (not tag and lines and COMMAND_START.match(lines[0])):
                blocks.append((doc, lines))
    return blocks


def without_comment(command: str) -> str:
    """The command without its trailing `# ...` (a '#' inside a word, as in sed's s#a#b#, stays)."""
    return re.sub(r"\s+#\s.*$", "", command)


def why_not_run(command: str) -> str | None:
    bare = without_comment(command)
    return next((why for pattern, why in NOT_RUN if re.search(pattern, bare)), None)


ASSIGNMENT = re.compile(r"^(export )?[A-Z_]+=(\"[^\"]*\"|'[^']*'|\S*)$")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like a fresh clone, as far as the commands read it: the repo's .venv, bench/ and scripts/
    linked, the files `sed -i` edits copied (so the checkout is never changed)."""
    work = tmp_path_factory.mktemp("clone")
    venv = Path(sys.executable).parent.parent
    (work / ".venv").symlink_to(venv)
    for name in ("bench", "scripts", "model", "training", "app", "cli", "tests", "pyproject.toml", "constraints.txt"):
        (work / name).symlink_to(ROOT / name)
    (work / "deploy" / "kserve").mkdir(parents=True)
    (work / "deploy" / "kserve" / "inferenceservice.yaml").write_text(
        (ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text()
    )
    return work


def run(command: str, setup: list[str], work: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(work)}
    env.pop("PETVIT_HOST_MOUNTS", None)
    env.pop("PETVIT_RUN_COMMAND", None)
    edited = work / command.split()[-1] if command.startswith("sed -i") else None
    before = edited.read_text() if edited else None
    script = "\n".join(["set -euo pipefail", *setup, command])
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    if edited:  # a sed whose pattern no longer matches succeeds silently: the file must have changed
        assert edited.read_text() != before, f"`{command}` changed nothing: the docs and {edited.name} drifted apart"


def test_every_documented_command_runs_or_says_why_not(scratch):
    ran, seen = [], set()
    for doc, lines in shell_blocks():
        setup: list[str] = []  # VAR=... lines earlier in the same block, as a shell pasting the block keeps them
        for command in lines:
            if why_not_run(command):
                continue
            if ASSIGNMENT.match(command):
                setup.append(command)
                continue
            same = without_comment(command).replace(".venv/bin/petvit", "petvit")
            if same in seen:  # README and docs/service.md show the same export: once is enough
                continue
            seen.add(same)
            run(command, setup, scratch)
            ran.append(f"{doc}: {command}")
    # What the docs promise of the ones that ran, beyond their exit status.
    assert (scratch / "artifacts" / "petvit.safetensors").stat().st_size > 1e6  # README's try-out export
    assert len(list((scratch / "data" / "digits").glob("*/*.png"))) == 1797  # models.md's digits, under data/
    assert "registry.example/petvit:cpu" in (scratch / "deploy" / "kserve" / "inferenceservice.yaml").read_text()
    assert len(ran) >= 5, ran


def test_every_reason_still_matches_a_documented_command():
    commands = [without_comment(command) for _, lines in shell_blocks() for command in lines]
    stale = [pattern for pattern, _ in NOT_RUN if not any(re.search(pattern, c) for c in commands)]
    assert not stale, f"reasons for commands the docs no longer show: {stale}"


def test_the_digits_example_writes_only_under_a_git_ignored_folder():
    """It used to leave an untracked digits/ folder in the clone."""
    (line,) = [c for _, lines in shell_blocks() for c in lines if "make_digits_tree(" in c]
    (folder,) = re.findall(r"make_digits_tree\(Path\('([^']+)'\)\)", line)
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/0/0.png"], cwd=ROOT)
    assert ignored.returncode == 0, f"{folder}/ is not git-ignored"
