"""model/explain.py: one run of the model gives each method's heatmap, the same as the rollout functions give by
hand, with gradients available even where the service runs (inference_mode) and for frozen weights."""

from __future__ import annotations

import pytest
import torch

from model.explain import (
    DEFAULT_METHOD,
    GRADIENT_ROLLOUT,
    PLAIN_ROLLOUT,
    SERVICE_METHODS,
    GradientUnavailableError,
    HeatmapMethod,
    heatmaps,
    measured_methods,
)
from model.rollout import attention_rollout, gradient_rollout
from tests.conftest import make_tiny_model


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_methods_are_named_and_checked() -> None:
    assert [m.key for m in measured_methods()] == [
        "rollout:mean:0",
        "rollout:mean:0.5",
        "rollout:mean:0.9",
        "rollout:max:0",
        "rollout:max:0.5",
        "rollout:max:0.9",
        "rollout:min:0",
        "rollout:min:0.5",
        "rollout:min:0.9",
        "gradient",
    ]
    assert PLAIN_ROLLOUT.key == "rollout:mean:0" and not PLAIN_ROLLOUT.needs_gradient
    assert GRADIENT_ROLLOUT.needs_gradient and DEFAULT_METHOD in SERVICE_METHODS
    with pytest.raises(ValueError, match="discard_ratio"):
        HeatmapMethod("rollout", "mean", 1.0)
    with pytest.raises(ValueError, match="head_fusion"):
        HeatmapMethod("rollout", "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        HeatmapMethod("lrp")  # type: ignore[arg-type]


def test_rollouts_equal_the_rollout_functions_on_the_models_attention() -> None:
    model, batch = make_tiny_model(), images()
    with torch.no_grad():
        expected_logits, attentions = model.forward_with_attention(batch)
        logits, maps = heatmaps(model, batch, measured_methods()[:-1])
    torch.testing.assert_close(logits, expected_logits)
    assert len(maps) == 9
    for method in measured_methods()[:-1]:
        expected = attention_rollout(attentions, method.head_fusion, method.discard_ratio)
        torch.testing.assert_close(maps[method.key], expected)
        assert maps[method.key].shape == (3, 4, 4) and not maps[method.key].requires_grad


def manual_gradient_rollout(model, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """model/rollout.py's recipe, written out: forward, grad of the target logits w.r.t. the attention, rollout."""
    logits, attentions = model.forward_with_attention(batch)
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), attentions)
    return gradient_rollout([a.detach() for a in attentions], grads)


def test_gradient_rollout_explains_the_predicted_class_by_default() -> None:
    model, batch = make_tiny_model(), images()
    predicted = model(batch).argmax(-1)
    expected = manual_gradient_rollout(model, batch, predicted)
    logits, maps = heatmaps(model, batch, [GRADIENT_ROLLOUT, PLAIN_ROLLOUT])
    torch.testing.assert_close(maps["gradient"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, model(batch), atol=1e-5, rtol=1e-5)  # float 0..1 input: same logits
    other = (predicted + 1) % 37
    _, for_other = heatmaps(model, batch, [GRADIENT_ROLLOUT], targets=other)
    expected_other = manual_gradient_rollout(model, batch, other)
    torch.testing.assert_close(for_other["gradient"], expected_other, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(for_other["gradient"], maps["gradient"])  # class-specific: another class, another map


def test_gradient_rollout_runs_under_inference_mode_and_with_frozen_weights() -> None:
    """The service predicts under torch.inference_mode and may freeze its weights; the gradient path must still
    get its gradients, and give the same map."""
    model, batch = make_tiny_model(), images(2, seed=1)
    _, free = heatmaps(model, batch, [GRADIENT_ROLLOUT])
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing accumulated on the weights
    model.requires_grad_(False)
    with torch.inference_mode():
        inference_batch = batch.clone()  # an inference tensor, as the service's batches are
        _, frozen = heatmaps(model, inference_batch, [GRADIENT_ROLLOUT])
    torch.testing.assert_close(frozen["gradient"], free["gradient"])
    assert frozen["gradient"].amax(dim=(1, 2)).tolist() == [1.0, 1.0]  # each image scaled by its own maximum


class Detached(torch.nn.Module):
    """A layer autograd cannot see through, as an int8-quantised Linear (torchao) is for its input."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).detach()


def test_gradient_rollout_of_a_model_without_gradients_says_so() -> None:
    model, batch = make_tiny_model(), images(2)
    model.blocks[0].attn.qkv = Detached(model.blocks[0].attn.qkv)
    with pytest.raises(GradientUnavailableError, match="int8-quantised model"):
        heatmaps(model, batch, [GRADIENT_ROLLOUT])
    _, maps = heatmaps(model, batch, [PLAIN_ROLLOUT])  # rollout needs no gradient
    assert maps[PLAIN_ROLLOUT.key].shape == (2, 4, 4)
