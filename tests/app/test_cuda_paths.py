"""CUDA-only paths of the service that the CPU suite can only stand in for: the compiled forward with CUDA graphs
(padded buckets, logits and open-set features from one graph) and the reload's real GPU-memory check.

Marked `gpu`: deselected by default, run by bench/gpu_figures.sh with `-m gpu` on a CUDA machine (forced on a
machine without one they fail, never skip: tests/conftest.py's guard)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.errors import ServiceError
from app.reload import check_fits
from model.inference import Classifier


@pytest.mark.gpu
def test_cuda_graph_forward_pads_to_buckets_and_answers_as_eager(tiny_artifact: Path, chelsea) -> None:
    """reduce-overhead (CUDA graphs): batches padded up to one bucket (11 -> 8 + 3 padded to 4), the padding's rows
    dropped, answers as the eager float32 model's (TF32 off: float32 means float32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = Classifier.from_artifact(tiny_artifact, "cuda", "float32")
    graphs = Classifier.from_artifact(tiny_artifact, "cuda", "float32", compile=True, max_batch_size=8)
    assert graphs.compiled and graphs.runner.compile_mode == "reduce-overhead"
    graphs.warmup(graphs.buckets or [])
    size = graphs.image_size
    photos = [chelsea.rotate(15 * i).resize((size, size)) for i in range(11)]
    # (H, W, 3) uint8 -> (3, H, W): the crop the preprocessor hands the batcher
    images = [torch.from_numpy(np.asarray(photo.convert("RGB"))).permute(2, 0, 1).contiguous() for photo in photos]
    for n in (1, 3, 11):
        for got, want in zip(graphs.predict(images[:n]), eager.predict(images[:n]), strict=True):
            torch.testing.assert_close(got.probs, want.probs, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_forward_with_features_answers_as_eager(open_set_digits) -> None:
    """An open set that reads the CLS feature: forward_with_features is what the CUDA graphs capture, and the
    open-set scores come out as the eager model's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = Classifier.from_artifact(open_set_digits.artifact, "cuda", "float32")
    graphs = Classifier.from_artifact(open_set_digits.artifact, "cuda", "float32", compile=True, max_batch_size=8)
    assert graphs.compiled and graphs.wants_features
    graphs.warmup(graphs.buckets or [])
    images = list(open_set_digits.unseen_images[:11])
    for n in (1, 3, 11):
        for got, want in zip(graphs.predict(images[:n]), eager.predict(images[:n]), strict=True):
            torch.testing.assert_close(got.probs, want.probs, rtol=1e-4, atol=1e-6)
            assert got.ood_score == pytest.approx(want.ood_score, rel=1e-3)


@pytest.mark.gpu
def test_reload_memory_check_reads_the_real_device(tiny_artifact: Path) -> None:
    """A small artifact fits beside nothing; a factor no GPU can meet is refused with the 409 that says why."""
    cuda = torch.device("cuda")
    check_fits(cuda, tiny_artifact, 1.5)  # fits: returns quietly
    free, _ = torch.cuda.mem_get_info(cuda)
    factor = 4 * free / tiny_artifact.stat().st_size
    with pytest.raises(ServiceError, match="MiB are free beside the live model") as refused:
        check_fits(cuda, tiny_artifact, factor)
    assert (refused.value.status, refused.value.code) == (409, "insufficient_gpu_memory")
