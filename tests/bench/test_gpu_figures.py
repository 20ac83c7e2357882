"""bench/gpu_figures.sh fails fast, before any long step, with a non-zero status saying why: a wheel listed in the
manifest but not carried, and no CUDA device on a GPU run. (The full CPU dry run is .ci/run's scripts/gpu-dryrun.sh.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(tmp_path: Path, **env: str) -> tuple[int, str]:
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_FIGURES_SITE": str(tmp_path / "site"), **env}
    done = subprocess.run(
        ["bash", "bench/gpu_figures.sh"], cwd=REPO, env=full, capture_output=True, text=True, timeout=600
    )
    return done.returncode, (out / "summary.txt").read_text()


def test_a_wheel_missing_from_the_manifest_stops_it_before_anything_runs(tmp_path: Path) -> None:
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "MANIFEST").write_text("fastapi\nsniffio\n")
    (wheels / "fastapi-0.1.0-py3-none-any.whl").write_bytes(b"")  # present; sniffio is not
    status, summary = run_script(tmp_path, GPU_FIGURES_WHEELS=str(wheels))
    assert status == 2
    assert "listed in" in summary and "not carried: sniffio" in summary
    assert "matmul peak" not in summary


def test_no_cuda_device_stops_a_gpu_run_before_the_long_steps(tmp_path: Path) -> None:
    """This machine has every package (its .venv) but no GPU: the fail-fast check says so and exits 2."""
    status, summary = run_script(tmp_path, GPU_FIGURES_NO_WHEELS="1", GPU_FIGURES_WHEELS=str(tmp_path / "none"))
    assert status == 2
    assert "torch.cuda.is_available() is False" in summary
    assert "fail-fast check failed" in summary and "matmul peak" not in summary


def test_an_unknown_device_is_refused(tmp_path: Path) -> None:
    status, summary = run_script(tmp_path, GPU_FIGURES_DEVICE="tpu")
    assert status == 2 and "must be cuda or cpu, not tpu" in summary
