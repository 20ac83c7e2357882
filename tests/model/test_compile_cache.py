"""model/compile_cache.py: the cache folder is keyed by the kernel settings (a folder filled under one ISA setting is
never opened under another), and the agreement check tells a faithful compiled / int8 forward from a wrong one."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from model.compile_cache import TOLERANCE, check_agreement, kernel_key, probe_batch, use_compile_cache
from model.inference import prepare_for_inference, quantise_int8
from tests.conftest import make_tiny_model

CPU = torch.device("cpu")


def test_the_key_changes_with_the_isa_setting_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native = kernel_key(CPU)
    assert kernel_key(CPU) == native  # stable within a setting
    assert native.startswith(
        f"torch{torch.__version__.split('+')[0]}-cpu-{torch.backends.cpu.get_cpu_capability().lower()}-"
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    avx2 = kernel_key(CPU)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert len({native, avx2, kernel_key(CPU)}) == 3


def test_the_cache_folder_is_the_keys_and_records_its_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv (not delenv) so monkeypatch restores both after the test: use_compile_cache writes os.environ.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "before"))
    folder = use_compile_cache(tmp_path, CPU)
    assert folder == tmp_path / kernel_key(CPU)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
    facts = json.loads((folder / "kernel_facts.json").read_text())
    assert facts["torch"] == torch.__version__
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(facts["env"]) >= {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"}


def test_compiled_float32_agrees_and_a_wrong_kernel_does_not() -> None:
    model = make_tiny_model().eval()
    probe = probe_batch(model.config.image_size)
    compiled = prepare_for_inference(copy.deepcopy(model), "float32", CPU, compile=True)
    good = check_agreement(compiled, model, probe, "float32")
    assert good.ok and good.relative_error < 1e-4 and good.top1_agreement == 1.0, good.why()
    off = check_agreement(lambda x: model(x) * 1.7e5, model, probe, "float32")  # the wrong-cache case
    assert not off.ok and "disagrees" in off.why()


def test_int8_agrees_within_its_tolerance() -> None:
    model = make_tiny_model().eval()
    probe = probe_batch(model.config.image_size)
    int8 = quantise_int8(copy.deepcopy(model))
    result = check_agreement(int8, model, probe, "int8")
    assert result.ok, result.why()
    assert 0 < result.relative_error < TOLERANCE["int8"]


def test_a_candidate_that_crashes_or_returns_nan_disagrees() -> None:
    model = make_tiny_model().eval()
    probe = probe_batch(model.config.image_size)

    def crash(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("heap corruption, say")

    assert not check_agreement(crash, model, probe, "int8").ok
    nan = check_agreement(lambda x: model(x) * float("nan"), model, probe, "bfloat16")
    assert not nan.ok and "non-finite" in nan.why()
