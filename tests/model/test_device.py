"""One device rule for training and serving: auto prefers cuda, then mps, then cpu; explicit misses are errors."""

from __future__ import annotations

import pytest
import torch

from model import device as device_module
from model.device import resolve_device


def fake_hardware(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device_module, "mps_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake_hardware(monkeypatch, cuda, mps)
    assert resolve_device("auto").type == expected


def test_cuda_index_is_kept_for_ddp_ranks_and_left_unset_otherwise(monkeypatch):
    fake_hardware(monkeypatch, cuda=True, mps=False)
    assert resolve_device("cuda", index=3) == torch.device("cuda", 3)
    assert resolve_device("auto").index is None


@pytest.mark.parametrize(("name", "words"), [("cuda", "no CUDA GPU"), ("mps", "MPS"), ("tpu", "unknown device")])
def test_an_explicit_device_that_is_missing_is_an_error_not_a_fallback(monkeypatch, name, words):
    fake_hardware(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match=words):
        resolve_device(name)
