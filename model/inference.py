"""What a trained model says about a batch of images: the one face every caller uses.

- `Classifier` (the service, `petvit predict`, the benches): an artifact on its device in its inference dtype,
  answering for a batch of prepared uint8 images in one forward: calibrated probabilities, top-k, the open-set score
  and `unknown`, and, for the images that ask, the heatmap by method.
- `batch_outputs` (evaluation, the open set's fitting and measuring, the linear probe's features): logits, the CLS
  feature and the head's input of a float32 model, by the one rule for where autocast stops.
- `prepare_for_inference`, under both: the model cast or quantised, moved and compiled.

Preparing a model for inference (`prepare_for_inference`), three things happen, in this order:
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
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import explain
from model.artifact import ArtifactMetadata, file_sha256, load_artifact
from model.batch_sizes import bucket_for, bucket_split, pow2_batch_sizes
from model.device import resolve_device
from model.int8_kernels import int8_reduce_range
from model.precision import canonical_dtype, dtype_name, is_quantised, resolve_dtype
from model.trust import calibrated
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
            logits: torch.Tensor = self.model(images)
        else:  # compiled with features, the forward answers (logits, features)
            logits = self._forward(images)[0] if self.with_features else self._forward(images)
        return logits

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes), CLS features (B, D)) from one pass (ViT.forward_with_features); compiled when the
        model was prepared with features=True and compiled."""
        if self._forward is not None and self.with_features:
            both: tuple[torch.Tensor, torch.Tensor] = self._forward(images)
            return both
        return self.model.forward_with_features(images)

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every block's attention weights (B, heads, T, T), eagerly on the same weights."""
        return self.model.forward_with_attention(images)

    def close(self) -> None:
        """Let go of what the compiled forward holds beyond the weights: the CUDA-graph thread. Idempotent; the
        eager forward still works afterwards, the compiled one does not."""
        if isinstance(self._forward, GraphThread):
            self._forward.close()


def prepare_for_inference(
    model: ViT,
    dtype: str,
    device: torch.device,
    compile: bool = False,
    features: bool = False,
    eager: bool = False,
) -> InferenceModel:
    """`model` cast or quantised to `dtype`, moved to `device`, in eval mode; its forward compiled when `compile`
    (or when `dtype` is int8, which is only worth serving compiled), unless `eager`: then never, int8 included (the
    service answers with the eager model while the compiled one is built behind it: app/lifecycle.py). The model
    is changed in place. features=True:
    callers want the CLS feature with the logits, so the compiled function is forward_with_features (one graph
    serves both; the plain forward of a model prepared without it is untouched).

    Raises ValueError for an unknown dtype and MissingExtraError when int8 is asked for without torchao.
    """
    name = canonical_dtype(dtype)
    if is_quantised(name):
        model = model.to(device=device, dtype=torch.float32).eval()
        quantise_int8(model)
        compute, compile = torch.float32, not eager
    else:
        compute = resolve_dtype(name, device)
        model = model.to(device=device, dtype=compute).eval()
        name = str(compute).removeprefix("torch.")  # "auto" -> what it chose
    prepared = InferenceModel(model, name, compute, device, with_features=features)
    if compile and not eager:
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


class GraphThread:
    """A CUDA-graph forward on one thread of its own (see compiled_forward), until close() shuts the thread down:
    a retired model generation must not leave its thread behind, one per reload."""

    def __init__(self, compiled: Callable[[torch.Tensor], Any]) -> None:
        self.compiled = compiled
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="petvit-cuda-graphs")

    def _run(self, images: torch.Tensor) -> Any:
        with torch.inference_mode():  # inference mode is per thread: enter it on the graphs' own thread
            out = self.compiled(images)
            return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    def __call__(self, images: torch.Tensor) -> Any:
        return self.pool.submit(self._run, images).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def compiled_forward(model: ViT, mode: str | None, features: bool = False) -> Callable[[torch.Tensor], Any]:
    """torch.compile of model.forward with static shapes. With CUDA graphs every call runs on one thread of its own
    (a GraphThread): torch's CUDA graph trees are kept per thread, so graphs recorded by a warm-up on one thread
    would be recorded again on the serving thread; and a replay overwrites the previous outputs, so they are cloned
    before returning."""
    # Each batch size is one cache entry of ViT.forward's code, and that code is shared by every ViT in the process;
    # past the limit (8) dynamo silently runs eager. The service's buckets reach 11 (1..1024), and a process may
    # prepare several models (tests, evaluation after serving), so the limit is raised, never lowered.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    target = model.forward_with_features if features else model
    compiled = torch.compile(target, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled
    return GraphThread(compiled)


# ---------------------------------------------------------------------------------------------- float32 weights
@dataclass(frozen=True)
class BatchOutputs:
    """What one forward says about a batch, in float32 on the model's device: uncalibrated logits (B, classes), the
    CLS feature the open-set score reads (B, D), and the feature the head reads (B, D; a linear probe's input)."""

    logits: torch.Tensor
    features: torch.Tensor
    pre_logits: torch.Tensor


def batch_outputs(model: ViT, images: torch.Tensor, amp: torch.dtype | None = None) -> BatchOutputs:
    """One batch through `model` by the one rule for where autocast stops: the backbone under autocast (when `amp`
    is given), the head(s) outside it, in their weights' dtype. On float32 weights (training, evaluation, the
    linear probe's features) the head costs nothing next to the blocks and the logits keep float32's resolution
    (bfloat16's 3 digits flip near-ties). A served model has its weights cast instead and no autocast
    (prepare_for_inference): the rule then is ViT.forward_with_features, which Classifier runs."""
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        tokens = model.forward_features(images)  # (B, prefix + N, D)
    special = tokens[:, : model.num_prefix_tokens].to(model.head.weight.dtype)  # (B, prefix, D): what heads read
    return BatchOutputs(
        logits=model.forward_head(special).float(),
        features=special[:, 0].float(),  # the CLS token (model/trust.py)
        pre_logits=model.forward_head(special, pre_logits=True).float(),
    )


# ----------------------------------------------------------------------------------------------- the served face
@dataclass
class ImagePrediction:
    probs: torch.Tensor  # (classes,) float32 on the CPU, calibrated by the artifact's temperature when it has one
    grid: torch.Tensor | None  # (rows, cols) heatmap in [0, 1], only when a heatmap was asked for
    ood_score: float | None = None  # the artifact's open-set score (higher: less like any class); None without one


def stack_to_device(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(3, S, S) uint8 tensors, on the host or already on `device` -> one (B, 3, S, S) batch on `device`.

    On CUDA the host ones (CPU-decoded uploads, fallbacks) are stacked straight into pinned (page-locked) memory and
    copied with non_blocking=True: from pageable memory the driver stages the copy through a pinned buffer of its own
    and the thread waits for it. PyTorch's pinned allocator keeps the buffer alive until the copy has run, so it may go
    out of scope here. Elsewhere this is the plain stack.
    """
    if device.type != "cuda":
        return torch.stack(list(images)).to(device, non_blocking=True)  # list of (3, S, S) -> (B, 3, S, S)
    on_host = [i for i, image in enumerate(images) if image.device.type == "cpu"]
    if not on_host:
        return torch.stack(list(images))  # list of (3, S, S), all on the device -> (B, 3, S, S)
    first = images[on_host[0]]
    staged = torch.empty((len(on_host), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack([images[i] for i in on_host], out=staged)  # (3, S, S) each -> (n, 3, S, S), pinned
    moved = staged.to(device, non_blocking=True)
    if len(on_host) == len(images):
        return moved
    placed = list(images)
    for row, i in enumerate(on_host):
        placed[i] = moved[row]
    return torch.stack(placed)  # list of (3, S, S), all on the device now -> (B, 3, S, S)


class Classifier:
    """A trained model's answers about a batch of prepared images, in one forward: calibrated probabilities, top-k,
    the open-set score and `unknown`, the CLS feature and, for the images that ask, the heatmap by method. The one
    face the service, `petvit predict` and the benches use (training's float32 passes use batch_outputs).

    Thread-safe: forwards are serialised (the service's inference thread, the CLI and warm-up). A compiled forward
    only ever sees the bucket sizes (model/batch_sizes.py), so warm-up can compile every shape it will meet.
    """

    def __init__(
        self,
        model: ViT,
        metadata: ArtifactMetadata,
        device: torch.device,
        dtype: torch.dtype | str,
        sha256: str = "",
        compile: bool = False,
        max_batch_size: int = 16,
        eager: bool = False,
    ) -> None:
        """`dtype` is a torch dtype or a name from model.precision's vocabulary ("int8" included); int8 and
        `compile` give a compiled forward, fed only the bucket sizes of max_batch_size (pow2_batch_sizes), unless
        `eager` (prepare_for_inference)."""
        name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
        # Trust (model/trust.py): logits / temperature before the softmax; the open-set score per image.
        self.calibration = metadata.calibration
        self.open_set = metadata.open_set
        self.wants_features = self.open_set is not None and self.open_set.needs_features
        self.runner = prepare_for_inference(model, name, device, compile, features=self.wants_features, eager=eager)
        self.model = self.runner.model
        self.metadata = metadata
        self.device = device
        self.dtype = self.runner.compute_dtype  # float32 for int8: what the unquantised parts compute in
        self.sha256 = sha256
        # Compiled graphs are specialised per batch size: pad each batch up to one of these few sizes.
        self.buckets: list[int] | None = pow2_batch_sizes(max_batch_size) if self.runner.compiled else None
        self.labels: list[str] = list(metadata.labels)
        self.species: list[str] = list(metadata.species)
        self.preprocessing = metadata.preprocessing  # what every upload is cropped to
        self._lock = threading.Lock()  # predict may be called from the CLI and warm-up; keep forwards serial

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        max_batch_size: int = 16,
        eager: bool = False,
    ) -> Classifier:
        dev = resolve_device(device)  # ValueError names a missing device; /readyz shows it
        model, meta = load_artifact(path, device="cpu")
        return cls(model, meta, dev, dtype, file_sha256(path), compile, max_batch_size, eager)

    @property
    def dtype_name(self) -> str:
        """'bfloat16', 'float32', 'int8', ...: how /readyz and /v1/model name the dtype."""
        return self.runner.dtype

    @property
    def compiled(self) -> bool:
        return self.runner.compiled

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def architecture(self) -> str:
        c = self.model.config
        variant = self.metadata.variant or "custom"
        return f"vit-{variant} (patch {c.patch_size}, width {c.hidden_dim}, depth {c.depth})"

    def top_k(self, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        """The k best classes of one image's probabilities as {label, score, species, index}, highest first."""
        scores, indices = torch.topk(probs, k)  # sorted, highest first
        return [
            {"label": self.labels[i], "score": float(s), "species": self.species[i], "index": i}
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]

    def unknown_threshold(self, override: float | None = None) -> float | None:
        """The open-set threshold in force: `override` (PETVIT_UNKNOWN_THRESHOLD) when set, else the artifact's; None
        when the artifact has no open-set score (then `unknown` is null whatever the setting)."""
        if self.open_set is None:
            return None
        return override if override is not None else self.open_set.threshold

    def is_unknown(self, score: float | None, override: float | None = None) -> bool | None:
        """Above the threshold: none of the classes. No threshold (or no score): the model cannot say (None)."""
        threshold = self.unknown_threshold(override)
        return None if threshold is None or score is None else score > threshold

    def forward(
        self, images: torch.Tensor, with_attention: bool, methods: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(B, 3, S, S) uint8 on the device -> (probs (B, classes) float32, heatmap (B, rows, cols) or None,
        open-set scores (B,) or None).

        methods: each image's heatmap method, a key of model.explain.SERVICE_METHODS (default DEFAULT_METHOD).
        One forward pass serves them all; "gradient" adds a backward pass over these images (autograd switched on
        inside, even under predict's inference_mode); its cost is in docs/service.md, "Heatmaps".
        """
        if not with_attention:
            logits, features = self.logits_and_features(images)
            return self._answers(logits, features, None)
        methods = methods or [explain.DEFAULT_METHOD] * images.shape[0]
        specs = {name: explain.SERVICE_METHODS[name] for name in methods}
        with _cls_feature_of(self.model, self.wants_features) as captured:
            logits, maps = explain.heatmaps(self.model, images, list(specs.values()))
        grid = torch.stack([maps[specs[name].key][i] for i, name in enumerate(methods)])  # (B, rows, cols)
        return self._answers(logits, captured[0] if captured else None, grid)

    def _answers(
        self, logits: torch.Tensor, features: torch.Tensor | None, grid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Calibrated probabilities, the grid, and the open-set scores (on the CPU, in float64 inside: a (B, D) copy
        is cheap, and not every accelerator has float64), from one pass's logits and CLS features."""
        logits = calibrated(logits.float(), self.calibration)
        scores = None
        if self.open_set is not None:
            cpu_features = None if features is None else features.float().cpu()
            scores = self.open_set.deciding_score(logits.cpu(), cpu_features)
        return logits.softmax(dim=-1), grid, scores

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, classes) uncalibrated logits on the fast path (see logits_and_features)."""
        return self.logits_and_features(images)[0]

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) -> (logits (B, classes), CLS features (B, D) when the open set reads them, else None) on the
        fast path. A compiled forward only ever sees bucket sizes. On a CPU the batch is split into buckets (13 ->
        8 + 4 + 1): its work grows with every row, so a padding row is work for nothing, while smaller batches cost
        about the same per image (docs/service.md has the figures). On a GPU a few more rows cost little and each
        call costs a launch, so the batch is padded with blank images up to one bucket instead (larger batches in
        chunks of the largest). Rows never mix in a ViT (int8 activations are scaled per token), so neither changes
        a real row's answer."""
        if self.buckets is None:
            return self._fast(images)
        if self.device.type == "cpu":
            chunks = torch.split(images, bucket_split(len(images), self.buckets))
            parts = [self._fast(chunk) for chunk in chunks]
        else:
            parts = [self._padded(chunk) for chunk in torch.split(images, self.buckets[-1])]
        if len(parts) == 1:
            return parts[0]
        features = [f for _, f in parts if f is not None]  # every chunk or none: they all run the same forward
        return torch.cat([lg for lg, _ in parts]), torch.cat(features) if features else None

    def _padded(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fast path on `images` padded with blank images up to their bucket; the padding's rows dropped."""
        assert self.buckets is not None
        n = len(images)
        if (size := bucket_for(n, self.buckets)) > n:
            blank = images.new_zeros((size - n, *images.shape[1:]))
            images = torch.cat([images, blank])  # (n, 3, S, S) -> (size, 3, S, S)
        logits, features = self._fast(images)
        return logits[:n], None if features is None else features[:n]

    def _fast(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.wants_features:
            return self.runner(images), None
        return self.runner.forward_with_features(images)

    @torch.inference_mode()
    def predict(
        self, images: list[torch.Tensor], heatmaps: list[bool] | None = None, methods: list[str] | None = None
    ) -> list[ImagePrediction]:
        """One batch: uint8 (3, S, S) tensors -> one ImagePrediction each, in order.

        The explicit-attention path is several times slower than SDPA, so only the images that asked for a
        heatmap take it; the rest of the batch runs on the fast path in its own forward. methods: each image's
        heatmap method (model.explain.SERVICE_METHODS' keys; default DEFAULT_METHOD for all).
        """
        if not images:
            return []
        heatmaps = heatmaps or [False] * len(images)
        methods = methods or [explain.DEFAULT_METHOD] * len(images)
        with self._lock:
            batch = stack_to_device(images, self.device)  # list of (3, S, S) -> (B, 3, S, S); pinned on CUDA
            probs = torch.empty(len(images), len(self.labels), dtype=torch.float32, device=self.device)
            scores = torch.full((len(images),), float("nan"), dtype=torch.float32)  # on the CPU, as computed
            grids: list[torch.Tensor | None] = [None] * len(images)
            for with_attention in (False, True):
                rows = [i for i, want in enumerate(heatmaps) if want == with_attention]
                if not rows:
                    continue
                index = torch.tensor(rows, device=self.device)
                sub = batch if len(rows) == len(images) else batch[index]
                p, g, s = self.forward(sub, with_attention, [methods[i] for i in rows])
                probs[index] = p
                if s is not None:
                    scores[rows] = s
                if g is not None:
                    for i, grid in zip(rows, g.float().cpu(), strict=True):
                        grids[i] = grid
            probs, score_list = probs.cpu(), scores.tolist()
        return [ImagePrediction(probs[i], grids[i], _score(score_list[i])) for i in range(len(images))]

    def warmup(self, batch_sizes: list[int]) -> float:
        """Run each batch size once (and the heatmap path once) so first requests don't pay for kernel selection,
        allocator growth, lazy initialisation or, when compiled, compilation. Returns the seconds spent."""
        start = time.perf_counter()
        size = self.image_size
        for b in batch_sizes:
            self.predict([torch.zeros(3, size, size, dtype=torch.uint8)] * b)
        self.predict([torch.zeros(3, size, size, dtype=torch.uint8)], [True])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        """Let go of the compiled forward's CUDA-graph thread (a retired model generation; idempotent)."""
        self.runner.close()


def _score(value: float) -> float | None:
    return None if math.isnan(value) else value


@contextlib.contextmanager
def _cls_feature_of(model: ViT, wanted: bool) -> Iterator[list[torch.Tensor]]:
    """While inside, the CLS token the final LayerNorm puts out, detached: the open-set feature of the explicit-
    attention pass (model.explain), without a second forward or a change to that path's signature. Empty when not
    wanted."""
    captured: list[torch.Tensor] = []
    if not wanted:
        yield captured
        return

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        captured.append(output[:, 0].detach())  # (B, prefix + N, D) -> (B, D)

    handle = model.norm.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


__all__ = [
    "INT8_EXTRA_HINT",
    "BatchOutputs",
    "Classifier",
    "GraphThread",
    "ImagePrediction",
    "InferenceModel",
    "MissingExtraError",
    "batch_outputs",
    "prepare_for_inference",
    "quantise_int8",
    "stack_to_device",
]
