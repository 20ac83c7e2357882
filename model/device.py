"""Which torch device to run on: one rule for training, evaluation and the service."""

from __future__ import annotations

import torch


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto", index: int | None = None) -> torch.device:
    """ "auto": cuda, then mps (Apple GPUs), then cpu. An explicit device that is missing is an error, never a
    silent fallback to a slower one. index picks the CUDA GPU (a DDP rank's local rank); None leaves it unset."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use 'auto' or 'cpu'")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    if name == "mps" and not mps_available():
        raise ValueError("device 'mps' was asked for but MPS (Apple GPU) is not available; use 'auto' or 'cpu'")
    if name not in {"cpu", "mps"}:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)
