"""model/int8_kernels.py: the int8 kernel probe finds the avx2 setting's saturating products, int8 then quantises in
the reduced range and stays faithful there (run in subprocesses under the kernel settings), and a kernel wrong even
in the reduced range refuses int8 with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.int8_kernels as int8_kernels
from model.inference import prepare_for_inference
from model.int8_kernels import Int8KernelReport, Int8Unfaithful, int8_kernel_report, int8_reduce_range
from tests.conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
REPORT = "import dataclasses, json; from model.int8_kernels import int8_kernel_report as r; print(json.dumps(dataclasses.asdict(r())))"  # noqa: E501


def run_python(code_or_args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter (the kernel choice is fixed at process start) with its own inductor cache."""
    full = {**os.environ, **env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=REPO, env=full, capture_output=True, text=True, timeout=1500
    )


def test_the_probe_finds_the_avx2_settings_overflow_and_the_reduced_range_exact(tmp_path: Path) -> None:
    done = run_python(["-c", REPORT], AVX2, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["capability"] == "AVX2" and report["onednn_isa"] == "AVX2"
    assert report["exact_full_range"] is False
    assert report["exact_reduced_range"] is True


def test_the_default_kernels_here_are_exact_in_the_full_range() -> None:
    """In-process, without settings: the report's exactness is what torch._int_mm does right now."""
    report = int8_kernel_report("cpu")
    a = torch.full((32, 64), 127, dtype=torch.int8)
    exact = bool((torch._int_mm(a, a.T.contiguous()) == 127 * 127 * 64).all())
    assert report.exact_full_range is exact
    assert int8_reduce_range(torch.device("cpu")) is (not exact)


def report_with(full: bool, reduced: bool) -> Int8KernelReport:
    return Int8KernelReport("cpu", "AVX2", "AVX2", (), exact_full_range=full, exact_reduced_range=reduced)


def test_a_saturating_kernel_quantises_in_the_reduced_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_kernels, "int8_kernel_report", lambda device="cpu": report_with(False, True))
    prepared = prepare_for_inference(make_tiny_model(), "int8", torch.device("cpu"))
    weight = prepared.model.blocks[0].mlp.fc1.weight
    assert weight.qdata.min().item() >= -64 and weight.qdata.max().item() <= 63
    assert weight.reduce_range is True


def test_a_kernel_wrong_even_in_the_reduced_range_refuses_int8_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_kernels, "int8_kernel_report", lambda device="cpu": report_with(False, False))
    with pytest.raises(Int8Unfaithful, match=r"int8 refused: .*ATen capability AVX2.*saturating int16.*float32"):
        prepare_for_inference(make_tiny_model(), "int8", torch.device("cpu"))


@pytest.mark.slow
def test_int8_stays_faithful_under_the_avx2_setting(tmp_path: Path) -> None:
    """The int8 agreement and rollout checks of tests/model/test_inference.py, run under the avx2 kernels with a
    fresh compile cache: 96.1 % agreement and a rollout off by 0.30 before the reduced range, passing with it."""
    selected = ["tests/model/test_inference.py", "-k", "int8_agrees or rollout"]
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *selected]
    done = run_python(args, AVX2, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
