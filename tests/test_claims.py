"""The published learning claims: bench/kernels.py merges runs over seeds and kernel settings into "held in N of M"
and mean [min, max], scripts/claims.py writes them into README.md and the docs, and what is committed there is what
the committed evidence (docs/evidence/*.json) says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.evidence import CLAIM_SHARE, held, machine, spread
from bench.kernels import format_merge, merge

REPO = Path(__file__).resolve().parents[1]


def fake_doc(setting: str, gains: list[float]) -> dict:
    runs = [
        {"seed": seed, "measures": {"gain": gain, "top1": 0.5 + gain}, "claims": {"helps": gain > 0}}
        for seed, gain in enumerate(gains)
    ]
    return {"machine": {"kernels": setting}, "claims": {"helps": "it helps"}, "runs": runs, "seconds": 1.0}


def test_merge_counts_every_run_of_every_setting() -> None:
    docs = {"native": fake_doc("native", [0.1, -0.2, 0.3]), "avx2": fake_doc("avx2", [0.2, 0.1, 0.4])}
    doc = merge("fake", docs, ["bench/kernels.py", "fake"])
    assert doc["all"]["claims"]["helps"] == {"held": 5, "runs": 6, "share": 5 / 6, "stands": True}
    assert doc["per_setting"]["native"]["claims"]["helps"]["held"] == 2
    gain = doc["all"]["measures"]["gain"]
    assert (gain["min"], gain["max"], gain["n"]) == (-0.2, 0.4, 6) and gain["mean"] == pytest.approx(0.15)
    assert [r["kernels"] for r in doc["runs"]] == ["native"] * 3 + ["avx2"] * 3
    table = format_merge(doc)
    assert "| gain | 0.150 [-0.200, 0.400] | 0.067 [-0.200, 0.300] | 0.233 [0.100, 0.400] |" in table
    assert "| it helps | held in 5 of 6 runs | 2/3 | 3/3 |" in table


def test_a_claim_below_80_percent_does_not_stand() -> None:
    assert CLAIM_SHARE == 0.8
    assert held([True] * 4 + [False])["stands"] and not held([True] * 3 + [False])["stands"]
    assert not held([])["stands"]
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0, "n": 3}


def test_machine_names_the_cpu_torch_and_kernel_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETVIT_KERNELS", "avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    info = machine()
    assert info["kernels"] == "avx2" and info["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert info["torch"] and info["cpu"]["model"] and info["cpu"]["logical_cpus"] >= 1
    if Path("/proc/cpuinfo").exists():
        assert info["cpu"]["flags"] and set(info["cpu"]["kernel_flags"]) <= set(info["cpu"]["flags"])


def test_readme_and_docs_say_what_the_evidence_says() -> None:
    """Nobody hand-edits a figure: the blocks are exactly what scripts/claims.py makes of docs/evidence/."""
    result = subprocess.run([sys.executable, "scripts/claims.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
