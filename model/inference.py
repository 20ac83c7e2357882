"""A ViT made ready for inference: the one entry point that serving and evaluation share (`prepare_for_inference`).

Three things happen, in this order:
1. dtype. A compute dtype ("float32", "bfloat16", "float16", "auto") casts the weights (model/precision.py's rule).
   "int8" keeps the float32 weights and quantises every nn.Linear through torchao: int8 weights (one scale per
   output channel) and dynamic int8 activations (one scale per token, computed as each batch arrives). Per token,
   not per tensor: then no row of a batch changes another row's scale, so padding a batch (the service's buckets)
   or batching images together changes no image's answer.
2. device.
3. torch.compile, when asked, and always for int8: eager int8 runs each quantise / int-matmul / rescale as separate
   kernels and is slower than float32; compiled, inductor fuses them. On CUDA the mode is "reduce-overhead" (CUDA
   graphs: a small batch costs one graph launch instead of hundreds of kernel launches); on CPU the default mode.
   Shapes are static (dynamic=False): callers pass a few fixed batch sizes (the service pads to its buckets), and
   each gets its own specialised graph.

The explicit-attention forward (heatmaps, attention rollout) always runs eagerly: it is the rare, slower path,
and compiling it would double the compile time for each batch size.

torchao is optional (the `[int8]` extra): it is imported only when int8 is asked for.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.int8_kernels import int8_reduce_range
from model.precision import canonical_dtype, is_quantised, resolve_dtype
from model.vit import ViT

INT8_EXTRA_HINT = "pip install 'petvit[int8]'"


class MissingExtraError(RuntimeError):
    """An optional dependency that the asked-for setting needs is not installed; the message names the extra."""


@dataclass
class InferenceModel:
    """A ViT on its device in its inference dtype, with the forward to serve from (compiled or not).

    Call it like the ViT: `logits = prepared(images)`; `forward_with_attention` is the ViT's, run eagerly.
    """

    model: ViT  # the eager module: weights cast, or Linear weights quantised
    dtype: str  # canonical name: "float32", "bfloat16", "float16" or "int8"
    compute_dtype: torch.dtype  # what the floating-point parts compute in (float32 for int8)
    device: torch.device
    compile_mode: str | None = None  # torch.compile's mode, or None when the forward is eager
    with_features: bool = False  # the compiled forward is forward_with_features (the open set reads the CLS feature)
    _forward: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)

    @property
    def compiled(self) -> bool:
        return self._forward is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 or float images on the device -> logits (B, classes)."""
        return self.forward(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            return self.model(images)
        return self._forward(images)[0] if self.with_features else self._forward(images)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes), CLS features (B, D)) from one pass (ViT.forward_with_features); compiled when the
        model was prepared with features=True and compiled."""
        if self._forward is not None and self.with_features:
            return self._forward(images)
        return self.model.forward_with_features(images)

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every block's attention weights (B, heads, T, T), eagerly on the same weights."""
        return self.model.forward_with_attention(images)


def prepare_for_inference(
    model: ViT, dtype: str, device: torch.device, compile: bool = False, features: bool = False
) -> InferenceModel:
    """`model` cast or quantised to `dtype`, moved to `device`, in eval mode; its forward compiled when `compile`
    (or when `dtype` is int8, which is only worth serving compiled). The model is changed in place. features=True:
    callers want the CLS feature with the logits, so the compiled function is forward_with_features (one graph
    serves both; the plain forward of a model prepared without it is untouched).

    Raises ValueError for an unknown dtype and MissingExtraError when int8 is asked for without torchao.
    """
    name = canonical_dtype(dtype)
    if is_quantised(name):
        model = model.to(device=device, dtype=torch.float32).eval()
        quantise_int8(model)
        compute, compile = torch.float32, True
    else:
        compute = resolve_dtype(name, device)
        model = model.to(device=device, dtype=compute).eval()
        name = str(compute).removeprefix("torch.")  # "auto" -> what it chose
    prepared = InferenceModel(model, name, compute, device, with_features=features)
    if compile:
        prepared.compile_mode = "reduce-overhead" if device.type == "cuda" else None
        prepared._forward = compiled_forward(model, prepared.compile_mode, features)
    return prepared


def quantise_int8(model: ViT) -> ViT:
    """Every nn.Linear in `model` (float32) -> int8 weights per output channel, int8 activations per token, in
    place. The patch embedding and the head are included: measured agreement with float32 stays above the bar
    (tests/model/test_inference.py)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as err:  # the optional [int8] extra
        raise MissingExtraError(f"dtype int8 needs torchao, the optional [int8] extra: {INT8_EXTRA_HINT}") from err
    # PerRow granularity (the default) is what makes the activation scales per token; see the module docstring.
    # reduce_range (7-bit) where this process's int8 kernel saturates full-range products (model/int8_kernels.py).
    reduce_range = int8_reduce_range(next(model.parameters()).device)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(reduce_range=reduce_range))
    return model


def compiled_forward(model: ViT, mode: str | None, features: bool = False) -> Callable[[torch.Tensor], Any]:
    """torch.compile of model.forward with static shapes. With CUDA graphs every call runs on one thread of its own:
    torch's CUDA graph trees are kept per thread, so graphs recorded by a warm-up on one thread would be recorded
    again on the serving thread; and a replay overwrites the previous outputs, so they are cloned before returning."""
    # Each batch size is one cache entry of ViT.forward's code, and that code is shared by every ViT in the process;
    # past the limit (8) dynamo silently runs eager. The service's buckets reach 11 (1..1024), and a process may
    # prepare several models (tests, evaluation after serving), so the limit is raised, never lowered.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    target = model.forward_with_features if features else model
    compiled = torch.compile(target, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled
    thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="petvit-cuda-graphs")

    def run(images: torch.Tensor) -> Any:
        with torch.inference_mode():  # inference mode is per thread: enter it on the graphs' own thread
            out = compiled(images)
            return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return lambda images: thread.submit(run, images).result()


__all__ = ["INT8_EXTRA_HINT", "InferenceModel", "MissingExtraError", "prepare_for_inference", "quantise_int8"]
