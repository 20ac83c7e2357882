"""mypy (configured in pyproject.toml: strict on model/, the default level on app/ cli/ training/) is part of the suite,
so a signature and its callers can't drift apart unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean():
    # no file arguments: the packages and levels come from [tool.mypy], the same run as the pre-commit hook's
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
