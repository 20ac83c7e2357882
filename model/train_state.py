"""The resumable training state in a run directory: one safetensors file, no pickle.

Tensors: the trained module's weights under "model.*" and the optimizer's per-parameter state under
"optim.<param index>.<name>". The safetensors header metadata carries JSON for everything else: the
optimizer's param groups, the epoch to continue from, the best epoch so far, the history and the configs.
RNG state is not stored: every epoch reseeds from (seed, epoch), so a resumed run draws the same numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "last_state.safetensors"
BEST_FILE = "best_weights.safetensors"


def save_train_state(
    path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]
) -> Path:
    """Write model + optimizer + JSON info atomically (a kill mid-write keeps the previous state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = tensor.detach().cpu().contiguous()
    meta = {"info": json.dumps(info), "param_groups": json.dumps(opt["param_groups"])}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_train_state(
    path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Restore module and optimizer in place from save_train_state's file; returns the JSON info."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path, device="cpu")
    module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["info"])


def save_weights(path: str | Path, module: torch.nn.Module) -> Path:
    """The trained module's weights alone, atomically (the best epoch: just the head for a linear probe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    module.load_state_dict(load_file(Path(path), device="cpu"))
