"""model/precision.py: one dtype vocabulary and one rule, the same for serving, training and the benches."""

from __future__ import annotations

import pytest
import torch

from model import precision
from model.precision import (
    DTYPE_CHOICES,
    INFERENCE_DTYPE_CHOICES,
    TRAINING_DTYPE_CHOICES,
    autocast_dtype,
    canonical_dtype,
    cpu_flags,
    dtype_name,
    is_quantised,
    resolve_dtype,
)


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend bfloat16 is (True) or is not (False) the faster dtype on this CPU."""

    def set_capability(native: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: native)

    return set_capability


@pytest.mark.parametrize(("native", "cpu_dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_is_bfloat16_where_the_hardware_runs_it(native_bf16, native, cpu_dtype):
    native_bf16(native)
    assert resolve_dtype("auto", torch.device("cpu")) is cpu_dtype
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16  # whatever the CPU
    assert resolve_dtype("auto", torch.device("mps")) is torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16  # an explicit choice is kept
    assert resolve_dtype("float32", torch.device("cuda")) is torch.float32


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse avx2 avx512f avx512bw avx512_vnni", False),  # AVX512 without BF16: bfloat16 only emulated
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # Cooper Lake, Zen 4 and later
        ("fpu avx2 avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids AMX
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert bool(cpu_flags(cpuinfo) & precision.NATIVE_BF16_CPU_FLAGS) is native
    assert cpu_flags(tmp_path / "absent") == frozenset()  # not Linux: no flags, so float32


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


def test_autocast_is_off_exactly_when_the_rule_says_float32(native_bf16):
    native_bf16(False)
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("float32", torch.device("cuda")) is None
    native_bf16(True)
    assert autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16  # training follows the serving rule


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown dtype 'int4'; choose one of auto, float32, bfloat16, float16, fp32"):
        canonical_dtype("int4")


def test_int8_is_an_inference_choice_that_no_compute_rule_accepts():
    assert "int8" in INFERENCE_DTYPE_CHOICES and "int8" not in DTYPE_CHOICES and "int8" not in TRAINING_DTYPE_CHOICES
    assert canonical_dtype(" INT8 ") == "int8" and is_quantised("int8")
    assert not any(is_quantised(name) for name in DTYPE_CHOICES)  # "auto" included: it never picks int8
    for refuse in (resolve_dtype, autocast_dtype):  # training asks autocast_dtype, so it cannot train in int8
        with pytest.raises(ValueError, match="int8 is a quantised dtype for inference only"):
            refuse("int8", torch.device("cpu"))


@pytest.mark.parametrize(
    ("flags", "speedup", "pays"),
    [(False, 3.0, False), (True, 2.0, True), (True, 1.19, False), (True, 0.65, False)],
    ids=["no-native-bf16", "measured-faster", "barely-faster", "measured-slower"],
)
def test_cpu_bf16_needs_the_flags_and_a_measured_win(monkeypatch, flags, speedup, pays):
    """The flags alone are not enough: on the development machine (AVX512-BF16, torch 2.14.1) bfloat16 matmuls
    measured 0.6-0.7x float32, so "auto" must not pick it there."""
    measured = []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: flags)
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: measured.append(1) or speedup)
    precision.cpu_bf16_pays.cache_clear()
    try:
        assert precision.cpu_bf16_pays() is pays
        assert precision.cpu_bf16_pays() is pays and len(measured) == (1 if flags else 0)  # measured once, if at all
    finally:
        precision.cpu_bf16_pays.cache_clear()


def test_the_bf16_measurement_returns_a_plausible_ratio():
    speedup = precision.bf16_matmul_speedup(size=64, repeats=2)
    assert 0.05 < speedup < 50  # a ratio of two real timings of the same product
