"""Fixtures for the training tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.training.pets_fixture import make_pets_tree


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for training-loop tests: on a shared CPU, extra threads spin at barriers and slow tiny
    models down 10x (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Oxford-IIIT Pet in torchvision's on-disk layout, 3 trainval and 2 test images per breed (a module may
    override it with other counts)."""
    return make_pets_tree(tmp_path_factory.mktemp("pets"), trainval_per_class=3, test_per_class=2)


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives a 1-process job (rank 0 of 1, a free loopback port): training then sets up
    a real gloo process group, DistributedSampler and DDP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
