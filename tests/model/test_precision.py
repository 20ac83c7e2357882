"""model/precision.py: one dtype vocabulary and one rule, the same for serving, training and the benches."""

from __future__ import annotations

import pytest
import torch

from model.precision import DTYPE_CHOICES, autocast_dtype, canonical_dtype, dtype_name, resolve_dtype


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("mps")) is torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16


@pytest.mark.parametrize(
    ("short", "name", "dtype"),
    [("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16), ("fp16", "float16", torch.float16)],
)
def test_short_forms_mean_the_same_dtype(short, name, dtype):
    assert canonical_dtype(short) == canonical_dtype(name) == name
    assert canonical_dtype(short.upper()) == name  # env vars are often written in capitals
    assert resolve_dtype(short, torch.device("cpu")) is resolve_dtype(name, torch.device("cpu")) is dtype
    assert dtype_name(dtype) == name
    assert short in DTYPE_CHOICES and name in DTYPE_CHOICES


def test_autocast_is_off_exactly_when_the_rule_says_float32():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("float32", torch.device("cuda")) is None


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown dtype 'int4'; choose one of auto, float32, bfloat16, float16, fp32"):
        canonical_dtype("int4")
