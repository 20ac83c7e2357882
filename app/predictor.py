"""The model on its device: batched forward passes, probabilities, and rollout grids for images that want them.

Called from the batcher's single inference thread, never from the event loop. model/inference.py prepares the
model (dtype or int8 quantisation, device, torch.compile); a compiled forward only ever sees the bucket sizes
(app/batch_sizes.py: a batch split into buckets on a CPU, padded up to one on a GPU), so warm-up can compile every
shape it will meet.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.batch_sizes import bucket_for, bucket_split, pow2_batch_sizes
from app.gpu_decode import stack_to_device
from model import explain
from model.artifact import ArtifactMetadata, file_sha256, load_artifact
from model.device import resolve_device
from model.inference import prepare_for_inference
from model.precision import dtype_name
from model.trust import calibrated
from model.vit import ViT

log = logging.getLogger("petvit.predictor")


@dataclass
class ImagePrediction:
    probs: torch.Tensor  # (classes,) float32 on the CPU, calibrated by the artifact's temperature when it has one
    grid: torch.Tensor | None  # (rows, cols) heatmap in [0, 1], only when a heatmap was asked for
    ood_score: float | None = None  # the artifact's open-set score (higher: less like any class); None without one


class Predictor:
    def __init__(
        self,
        model: ViT,
        metadata: ArtifactMetadata,
        device: torch.device,
        dtype: torch.dtype | str,
        sha256: str = "",
        compile: bool = False,
        max_batch_size: int = 16,
    ) -> None:
        """`dtype` is a torch dtype or a name from model.precision's vocabulary ("int8" included); int8 and
        `compile` give a compiled forward, fed only the bucket sizes of max_batch_size (pow2_batch_sizes)."""
        name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
        # Trust (model/trust.py): logits / temperature before the softmax; the open-set score per image.
        self.calibration = metadata.calibration
        self.open_set = metadata.open_set
        self.wants_features = self.open_set is not None and self.open_set.needs_features
        self.runner = prepare_for_inference(model, name, device, compile, features=self.wants_features)
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
    ) -> Predictor:
        dev = resolve_device(device)  # ValueError names a missing device; /readyz shows it
        model, meta = load_artifact(path, device="cpu")
        return cls(model, meta, dev, dtype, file_sha256(path), compile, max_batch_size)

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
        8 + 4 + 1): its work grows with every row, so a padding row is work for nothing (padding 9 images to 16 ran
        the int8 service at 0.6x its raw model), while smaller batches cost about the same per image (int8 b16, one
        thread: 9.3 img per CPU-second at batch 4 and 8, 8.6 at 16). On a GPU a few more rows cost little and each
        call costs a launch, so the batch is padded with blank images up to one bucket instead (larger batches in
        chunks of the largest). Rows never mix in a ViT (int8 activations are scaled per token), so neither changes
        a real row's answer."""
        if self.buckets is None:
            return self._fast(images)
        if self.device.type == "cpu":
            chunks = images.split(bucket_split(len(images), self.buckets))
            parts = [self._fast(chunk) for chunk in chunks]
        else:
            parts = [self._padded(chunk) for chunk in images.split(self.buckets[-1])]
        if len(parts) == 1:
            return parts[0]
        features = [f for _, f in parts]
        return torch.cat([lg for lg, _ in parts]), None if features[0] is None else torch.cat(features)

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
            probs, scores = probs.cpu(), scores.tolist()
        return [ImagePrediction(probs[i], grids[i], _score(scores[i])) for i in range(len(images))]

    def unknown_threshold(self, override: float | None = None) -> float | None:
        """The open-set threshold in force: PETVIT_UNKNOWN_THRESHOLD when set, else the artifact's; None when the
        artifact has no open-set score (then `unknown` is null whatever the setting)."""
        if self.open_set is None:
            return None
        return override if override is not None else self.open_set.threshold

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


def _score(value: float) -> float | None:
    return None if math.isnan(value) else value


@contextlib.contextmanager
def _cls_feature_of(model: ViT, wanted: bool) -> Iterator[list[torch.Tensor]]:
    """While inside, the CLS token the final LayerNorm puts out, detached: the open-set feature of the explicit-
    attention pass, without a second forward or a change to that path's signature. Empty when not wanted."""
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


def warmup_sizes(max_batch_size: int, policy: str, device: torch.device, buckets: list[int] | None = None) -> list[int]:
    """Batch sizes to warm. The batcher can form every size 1..max_batch_size; on accelerators each size may get
    its own kernels, so warm them all ("all"); on CPU the cost grows as N^2/2 images and kernels hardly depend on
    B, so powers of two plus the maximum ("pow2") is enough to grow the allocator and build oneDNN primitives.

    A compiled predictor's `buckets` are warmed whatever the policy, "none" included: each is a compilation of
    seconds to minutes, which must happen before /readyz says 200, not in a client's request."""
    if buckets:
        return list(buckets)
    if policy == "none":
        return []
    if policy == "auto":
        policy = "pow2" if device.type == "cpu" else "all"
    if policy == "all":
        return list(range(1, max_batch_size + 1))
    return pow2_batch_sizes(max_batch_size)
