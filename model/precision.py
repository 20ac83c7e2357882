"""One dtype vocabulary and one rule for choosing it: serving, training, evaluation and the benches all use this.

Names are torch's own (`float32`, `bfloat16`, `float16`); the short forms people type (`fp32`, `bf16`, `fp16`)
mean the same. `auto` is the rule: bfloat16 on CUDA, where tensor cores run it at several times float32's rate and
classification accuracy does not notice; float32 elsewhere.

Serving casts the weights to the chosen dtype (`resolve_dtype`). Training and evaluation keep float32 weights and
run the forward under autocast (`autocast_dtype`, None when that is float32), so the optimiser still updates
float32 master weights.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What a command line or a setting accepts: "auto", torch's names and the short forms.
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES, *ALIASES)
# Training autocasts to bfloat16 or not at all: float16 would need loss scaling (a GradScaler) to keep small
# gradients from underflowing, and bfloat16 has float32's range without it.
TRAINING_DTYPE_CHOICES: tuple[str, ...] = tuple(c for c in DTYPE_CHOICES if c not in ("float16", "fp16"))


def canonical_dtype(name: str) -> str:
    """ "auto" or torch's name for `name` ("bf16" -> "bfloat16"); ValueError naming the choices otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key != "auto" and key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return key


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to compute in on `device`: the rule for "auto", else the named dtype."""
    key = canonical_dtype(name)
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[key]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype for torch.autocast on `device`, or None when the rule says float32 (autocast off)."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how /readyz, /v1/model, logs and bench tables name a dtype."""
    return str(dtype).removeprefix("torch.")
