"""Frozen-backbone CLS features for linear probes, extracted once and cached on disk as safetensors.

The cache key hashes everything that changes the features (backbone weights and the config fields that are not
weights -- normalisation, heads, LayerNorm eps --, the transform, the autocast dtype, the exact list of images
with each file's size and modification time), so a stale cache is never reused and a second run or a --resume
skips the expensive forward passes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.artifact import save_file_atomically
from model.vit import ViT
from training.data import TransformedSubset
from training.evaluate import predict


def backbone_fingerprint(model: ViT) -> str:
    """A short hash of the backbone: its weights (not the head's: it is what the probe trains) and the config,
    whose mean/std, heads and eps change the features without changing a single weight."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "num_classes"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_stamp(path: str) -> list[Any]:
    """[path, size, mtime_ns]: an image replaced under the same name changes its stamp."""
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, stat.st_size, stat.st_mtime_ns]


def dataset_fingerprint(dataset: Sized) -> str:
    """Hash of the image files (names, sizes, mtimes), targets and transform when the dataset exposes them,
    else just its length."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    base = getattr(dataset, "base", None)
    indices = getattr(dataset, "indices", None)
    files = getattr(base, "samples", None) or [(str(p), 0) for p in getattr(base, "_images", [])]
    if indices is not None and files:
        digest.update(json.dumps([_file_stamp(str(files[i][0])) for i in indices]).encode())
    if hasattr(dataset, "targets"):
        digest.update(json.dumps(dataset.targets()).encode())
    digest.update(repr(getattr(dataset, "transform", None)).encode())  # resize/crop sizes, interpolation
    return digest.hexdigest()[:16]


def cached_features(
    cache_dir: str | Path,
    split: str,
    model: ViT,
    dataset: TransformedSubset,
    preprocessing: dict[str, Any],
    **extract_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Features for `dataset`, read from cache_dir when the key matches, else extracted and written.

    Returns (features, targets, hit) where hit says whether the cache was used.
    """
    key_doc = {
        "backbone": backbone_fingerprint(model),
        "data": dataset_fingerprint(dataset),
        "preprocessing": preprocessing,
        "autocast": str(extract_kwargs.get("autocast_dtype")),  # bf16 features are not fp32 features
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    if path.exists():
        tensors = load_file(path)
        return tensors["features"], tensors["targets"], True
    # The frozen backbone's CLS features (N, D) in dataset order: evaluation's loop, stopping before the head.
    feats, targets = predict(model, dataset, desc=f"extract {split} features", pre_logits=True, **extract_kwargs)
    # Atomic: an interrupted extraction never leaves a truncated cache behind.
    save_file_atomically({"features": feats.contiguous(), "targets": targets}, path, {"key": json.dumps(key_doc)})
    return feats, targets, False
