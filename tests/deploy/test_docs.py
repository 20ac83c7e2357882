"""README.md and docs/deploy.md: every `docker compose run ... train <petvit command>` they show is one the CLI
accepts, and writes the artifact file the api of that same command line serves (one file name: what
PETVIT_ARTIFACT_FILE says, else petvit.safetensors), at the in-container path /artifacts/NAME."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/deploy.md")
RUN_OPTIONS_WITH_VALUE = {"-v", "--volume", "-e", "--env", "-f", "--file", "-p", "--project-name", "--entrypoint"}


def fenced_blocks(doc: str) -> list[str]:
    """The code blocks, continuation lines joined: what people paste."""
    text = (ROOT / doc).read_text()
    return [b.replace("\\\n", " ") for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]


def code_of(doc: str) -> list[str]:
    """Fenced blocks and inline code spans."""
    prose = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.S)
    return fenced_blocks(doc) + re.findall(r"`([^`\n]+)`", prose)


def compose_runs(doc: str) -> list[tuple[list[str], dict[str, str]]]:
    """(tokens after the service name, the compose variables in force) for each `docker compose run ... train`."""
    runs = []
    for code in code_of(doc):
        exported = dict(_assignments(code))
        for line in code.splitlines():
            if "compose run" not in line:
                continue
            tokens = shlex.split(line.split("#")[0])
            env = dict(exported)
            while tokens and "=" in tokens[0]:
                name, _, value = tokens.pop(0).partition("=")
                env[name] = value
            i = tokens.index("run") + 1
            while tokens[i].startswith("-"):
                i += 2 if tokens[i] in RUN_OPTIONS_WITH_VALUE else 1
            assert tokens[i] == "train", f"{doc}: {line}"
            runs.append((tokens[i + 1 :], env))
    return runs


def _assignments(code: str) -> list[tuple[str, str]]:
    pairs = []
    for line in re.findall(r"^export (.+)$", code, re.M):
        pairs += [tuple(token.split("=", 1)) for token in shlex.split(line)]
    return pairs


@pytest.mark.parametrize("doc", DOCS)
def test_every_compose_run_writes_the_file_the_api_serves(doc, petvit_args):
    runs = compose_runs(doc)
    for argv, env in runs:
        args = petvit_args(argv)
        name = env.get("PETVIT_ARTIFACT_FILE", "petvit.safetensors")
        assert Path(args.out) == Path("/artifacts") / name, f"{doc}: {' '.join(argv)} with {env}"
    if doc == "docs/deploy.md":
        assert {argv[0] for argv, _ in runs} == {"export", "train"}


def test_the_docs_need_no_chmod_for_compose():
    for doc in DOCS:
        for code in fenced_blocks(doc):
            assert not re.search(r"^\s*(sudo )?chmod\s+\S", code, re.M), f"{doc} still tells people to chmod: {code}"
