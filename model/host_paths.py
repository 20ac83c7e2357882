"""Messages in the user's own terms: container folders as the host folders they are mounted from, and suggested
petvit commands as they are typed where this process was started.

Inside a container, petvit sees /data and /artifacts; the person reading its messages knows ./data and ./artifacts.
docker-compose.yml passes its own volume lines in, so nothing here guesses:

  PETVIT_HOST_MOUNTS   "/artifacts=./artifacts;/data=./data": container folder = host folder, ';' between pairs
  PETVIT_RUN_COMMAND   what runs a petvit subcommand there, e.g. "docker compose run --rm train" (default "petvit")

Unset (a plain install, `docker run`, Kubernetes), every message is left as it is. Standard library only.
"""

from __future__ import annotations

import os
import re

MOUNTS_VARIABLE = "PETVIT_HOST_MOUNTS"  # cli/messages.py names both too (it must not import torch to check them)
RUN_COMMAND_VARIABLE = "PETVIT_RUN_COMMAND"


def host_mounts() -> dict[str, str]:
    """{container folder: host folder} from PETVIT_HOST_MOUNTS; pairs without both sides are skipped."""
    mounts = {}
    for pair in os.environ.get(MOUNTS_VARIABLE, "").split(";"):
        inside, _, outside = pair.partition("=")
        inside, outside = inside.strip().rstrip("/"), outside.strip()
        if inside.startswith("/") and outside:
            mounts[inside] = outside.rstrip("/") or "/"
    return mounts


def host_path(path: str | os.PathLike[str]) -> str:
    """/data/torch/hub/x.pth -> ./data/torch/hub/x.pth under compose; unchanged elsewhere or outside the mounts."""
    text = os.fspath(path)
    for inside, outside in host_mounts().items():
        if text == inside or text.startswith(inside + "/"):
            return outside + text[len(inside) :]
    return text


def run_command() -> str:
    """How a petvit subcommand is typed where this process runs ("petvit export ..." or "docker compose run ...")."""
    return os.environ.get(RUN_COMMAND_VARIABLE, "").strip() or "petvit"


_COMMAND = re.compile(r"`petvit ([^`]*)`")


def in_host_terms(message: str) -> str:
    """A message as the user should read it: every container path in the prose as its host path, every quoted
    `petvit ...` command as it is run here (its paths stay the container's: that is where the command runs)."""
    mounts = host_mounts()
    prefix = run_command()
    if not mounts and prefix == "petvit":
        return message
    pieces = _COMMAND.split(message)  # even indices: prose; odd: the arguments of a `petvit ...` command
    for i in range(0, len(pieces), 2):
        for inside, outside in mounts.items():
            # a container folder at the start of a path only (not inside /x/data or a URL's .../data)
            pattern = rf"(?<![\w.~/:-]){re.escape(inside)}(?![\w-])"
            pieces[i] = re.sub(pattern, lambda _, host=outside: host, pieces[i])
    for i in range(1, len(pieces), 2):
        pieces[i] = f"`{prefix} {pieces[i]}`"
    return "".join(pieces)
