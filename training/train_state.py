"""The resumable training state in a run directory: one safetensors file, no pickle.

Tensors: the trained module's weights under "model.*" and the optimizer's per-parameter state under
"optim.<param index>.<name>". The safetensors header metadata carries JSON for everything else: the
optimizer's param groups, the epoch to continue from, the best epoch so far, the history and the configs.
RNG state is not stored: every epoch reseeds from (seed, epoch, rank), so a resumed run draws the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.artifact import save_file_atomically

STATE_FILE = "last_state.safetensors"
BEST_FILE = "best_weights.safetensors"


def save_train_state(
    path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]
) -> Path:
    """Write model + optimizer + JSON info atomically (a kill mid-write keeps the previous state)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = tensor.detach().cpu().contiguous()
    meta = {"info": json.dumps(info), "param_groups": json.dumps(opt["param_groups"])}
    return save_file_atomically(tensors, path, metadata=meta)


def _state_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_train_state_info(path: str | Path) -> dict[str, Any]:
    """The JSON info of a state file alone (header only): check it fits this run before loading any tensor."""
    return json.loads(_state_metadata(Path(path))["info"])


def load_train_state(
    path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Restore module and optimizer in place from save_train_state's file; returns the JSON info.

    Raises ValueError (not load_state_dict's RuntimeError) when the saved weights do not fit `module`.
    """
    path = Path(path)
    meta = _state_metadata(path)
    tensors = load_file(path, device="cpu")
    try:
        module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as err:
        first = " ".join(line.strip() for line in str(err).splitlines()[:2])  # the header and the first mismatch
        raise ValueError(f"{path} holds weights of another model shape: {first}") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["info"])


def save_weights(path: str | Path, module: torch.nn.Module) -> Path:
    """The trained module's weights alone, atomically (the best epoch: just the head for a linear probe)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return save_file_atomically(tensors, path)


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    module.load_state_dict(load_file(Path(path), device="cpu"))
