"""model/inference.py: int8 agrees with float32 on a real trained model, its rollout stays faithful, compiled equals
eager, and a missing torchao is named as the [int8] extra."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from model.inference import InferenceModel, MissingExtraError, prepare_for_inference
from model.rollout import attention_rollout
from model.vit import ViT
from tests.conftest import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def int8_digits(digits_model) -> InferenceModel:
    """The digits model quantised to int8 and compiled, once for this module (a compilation costs seconds)."""
    model, _, _ = digits_model
    return prepare_for_inference(copy.deepcopy(model), "int8", CPU)


@pytest.mark.learning
def test_int8_agrees_with_float32_on_held_out_digits(digits_model, int8_digits: InferenceModel) -> None:
    model, images, labels = digits_model
    with torch.inference_mode():
        reference = model(images).argmax(-1)
        quantised = int8_digits(images).argmax(-1)
    float_top1 = (reference == labels).float().mean().item()
    int8_top1 = (quantised == labels).float().mean().item()
    agreement = (quantised == reference).float().mean().item()
    assert float_top1 >= 0.90, "the digits model did not train: the agreement below would mean little"
    # Where the CPU's int8 kernel saturates full-range products (no VNNI/AMX: oneDNN held to AVX2), int8 runs with
    # 7-bit activations (model/int8_kernels.py); the same bar holds on every kernel setting (docs/trust.md).
    assert agreement >= 0.98, f"int8 agrees with float32 on {agreement:.1%} of {len(labels)} held-out digits"
    assert int8_top1 >= float_top1 - 0.02
    # It really is int8: the Linear weights are torchao's int8 tensors, the forward is compiled, and it is named so.
    assert int8_digits.compiled and int8_digits.dtype == "int8" and int8_digits.compute_dtype is torch.float32
    weight = int8_digits.model.blocks[0].mlp.fc1.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype is torch.int8


@pytest.mark.learning
def test_int8_rollout_stays_faithful_to_float32(digits_model, int8_digits: InferenceModel) -> None:
    """The heatmap path runs on the int8 weights: their rollout grids must show what float32's show."""
    model, images, _ = digits_model
    with torch.inference_mode():
        _, reference = model.forward_with_attention(images)
        _, quantised = int8_digits.forward_with_attention(images)
    grid = (4, 4)
    ref, got = attention_rollout(reference, grid=grid).flatten(1), attention_rollout(quantised, grid=grid).flatten(1)
    correlation = torch.stack([torch.corrcoef(torch.stack([r, g]))[0, 1] for r, g in zip(ref, got, strict=True)])
    same_hottest = (ref.argmax(-1) == got.argmax(-1)).float().mean()  # the hottest patch is the same one
    # grids are in [0, 1]; measured with VNNI max abs 0.014-0.042, correlation >= 0.9998 (docs/trust.md)
    assert (ref - got).abs().max() < 0.05
    assert correlation.min() > 0.99
    assert same_hottest >= 0.95


@pytest.mark.learning
def test_compiled_forward_matches_eager_in_float32(tiny_model: ViT) -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = tiny_model(images)
        compiled = prepare_for_inference(copy.deepcopy(tiny_model), "float32", CPU, compile=True)
        assert compiled.compiled and compiled.compile_mode is None  # CPU: inductor's default mode, no CUDA graphs
        torch.testing.assert_close(compiled(images), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.forward_with_attention(images)[0], eager, rtol=1e-5, atol=1e-5)


def test_compute_dtypes_cast_and_stay_eager_unless_asked() -> None:
    prepared = prepare_for_inference(make_tiny_model(), "bf16", CPU)
    assert prepared.dtype == "bfloat16" and not prepared.compiled
    assert prepared.model.patch_embed.weight.dtype is torch.bfloat16 and prepared.model.mean.dtype is torch.float32
    auto = prepare_for_inference(make_tiny_model(), "auto", CPU)
    assert auto.dtype in ("float32", "bfloat16")  # auto never picks int8


def test_int8_without_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(MissingExtraError, match=r"dtype int8 needs torchao.*pip install 'petvit\[int8\]'"):
        prepare_for_inference(make_tiny_model(), "int8", CPU)


def test_unknown_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'int4'; choose one of .*int8"):
        prepare_for_inference(make_tiny_model(), "int4", CPU)


@pytest.mark.learning
def test_bfloat16_agrees_with_float32_on_held_out_digits(digits_model) -> None:
    """The dtype "auto" picks on this CPU (and on CUDA), measured on a real trained model both ways bf16 is run:
    weights cast, as the service serves it, and autocast, as training and `petvit evaluate` score it."""
    model, images, labels = digits_model
    served = prepare_for_inference(copy.deepcopy(model), "bfloat16", CPU)
    with torch.inference_mode():
        reference = model(images).argmax(-1)
        cast = served(images).argmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(images).argmax(-1)
    float_top1 = (reference == labels).float().mean().item()
    assert float_top1 >= 0.90, "the digits model did not train: the agreement below would mean little"
    for name, predicted in (("cast", cast), ("autocast", autocast)):
        agreement = (predicted == reference).float().mean().item()
        print(f"bfloat16 {name}: top-1 agreement with float32 {agreement:.2%} on {len(labels)} held-out digits")
        assert agreement >= 0.99, f"bfloat16 ({name}) agrees with float32 on {agreement:.1%}"
    assert served.model.blocks[0].mlp.fc1.weight.dtype is torch.bfloat16  # it really ran in bfloat16
