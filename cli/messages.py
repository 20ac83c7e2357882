"""What the command line prints, in the user's terms: host folders under compose (model/host_paths.py), and one line
instead of a traceback when the output folder cannot be written."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TextIO

# model.host_paths is imported only where it is used: importing `model` imports torch, and `petvit classify` and
# `petvit --help` must stay quick (they never need it outside compose).
# Set by the Dockerfile: the process runs in petvit's image (docker run, compose, Kubernetes).
IN_IMAGE_VARIABLE = "PETVIT_IN_IMAGE"
# docker-compose.yml sets these (model/host_paths.py reads them).
MOUNTS_VARIABLE, RUN_COMMAND_VARIABLE = "PETVIT_HOST_MOUNTS", "PETVIT_RUN_COMMAND"
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class HostTermsStream:
    """A text stream that writes every message in host terms. print() and logging write whole messages, tqdm whole
    bars, so a path is never split between two writes."""

    def __init__(self, stream: TextIO) -> None:
        from model.host_paths import in_host_terms

        self._stream = stream
        self._in_host_terms = in_host_terms

    def write(self, text: str) -> int:
        self._stream.write(self._in_host_terms(text))
        return len(text)  # what the caller wrote, as TextIO.write reports it

    def __getattr__(self, name: str) -> object:  # flush, fileno, isatty, encoding, buffer ...
        return getattr(self._stream, name)


def use_host_terms() -> None:
    """Under compose (which says where its folders are), stdout and stderr speak in host folders."""
    if os.environ.get(MOUNTS_VARIABLE) or os.environ.get(RUN_COMMAND_VARIABLE):
        sys.stdout = HostTermsStream(sys.stdout)
        sys.stderr = HostTermsStream(sys.stderr)


def is_not_writable(err: OSError) -> bool:
    return err.errno in NOT_WRITABLE and err.filename is not None


def not_writable_line(err: OSError) -> str:
    """One line for a folder this process cannot write: which file, who runs, who owns the folder, what to do."""
    from model.host_paths import host_path

    path = Path(os.fsdecode(err.filename))
    folder = next((p for p in (path, *path.parents) if p.exists()), path)
    folder = folder if folder.is_dir() else folder.parent
    shown = host_path(folder)
    if err.errno == errno.EROFS:
        return f"cannot write {host_path(path)}: {shown} is read-only here; choose an output in a writable folder"
    uid, gid = os.getuid(), os.getgid()
    try:
        st = folder.stat()
        owner, owner_gid = st.st_uid, st.st_gid
    except OSError:
        return f"cannot write {host_path(path)}: permission denied for uid {uid}; choose a folder uid {uid} can write"
    mode = f"mode {st.st_mode & 0o777:o}"
    if owner == uid:
        return f"cannot write {host_path(path)}: {shown} is yours but not writable ({mode}): chmod u+w {shown}"
    head = f"cannot write {host_path(path)}: {shown} belongs to uid {owner} ({mode}), not uid {uid}"
    if os.environ.get(RUN_COMMAND_VARIABLE):  # compose runs petvit as the owner of the artifacts folder
        return f"{head}, who runs petvit here: give it to them with: sudo chown -R {uid}:{gid} {shown}"
    if os.environ.get(IN_IMAGE_VARIABLE):
        return f"{head}: run the container as the folder's owner: docker run --user {owner}:{owner_gid} ..."
    return f"{head}: choose another output folder, or make this one writable for uid {uid}"
