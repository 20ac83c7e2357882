"""Frozen-backbone CLS features for linear probes, extracted once and cached on disk as safetensors.

The cache key hashes everything that changes the features (backbone weights, preprocessing, the exact list of
images), so a stale cache is never reused and a second run or a --resume skips the expensive forward passes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from model.evaluate import predict
from model.vit import ViT


def backbone_fingerprint(model: ViT) -> str:
    """A short hash of the backbone's weights (the head is excluded: it is what the probe trains)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset) -> str:
    """Hash of the image list and targets when the dataset exposes them, else just its length."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    base = getattr(dataset, "base", None)
    indices = getattr(dataset, "indices", None)
    files = getattr(base, "samples", None) or [(str(p), 0) for p in getattr(base, "_images", [])]
    if indices is not None and files:
        digest.update(json.dumps([str(files[i][0]) for i in indices]).encode())
    if hasattr(dataset, "targets"):
        digest.update(json.dumps(dataset.targets()).encode())
    return digest.hexdigest()[:16]


def extract_features(
    model: ViT,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, targets (N,) int64) in dataset order: the frozen backbone's CLS features."""
    return predict(model, dataset, batch_size, device, num_workers, autocast_dtype, desc, pre_logits=True)


def cached_features(
    cache_dir: str | Path,
    split: str,
    model: ViT,
    dataset: Dataset,
    preprocessing: dict,
    **extract_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Features for `dataset`, read from cache_dir when the key matches, else extracted and written.

    Returns (features, targets, hit) where hit says whether the cache was used.
    """
    key_doc = {
        "backbone": backbone_fingerprint(model),
        "data": dataset_fingerprint(dataset),
        "preprocessing": preprocessing,
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    if path.exists():
        tensors = load_file(path)
        return tensors["features"], tensors["targets"], True
    feats, targets = extract_features(model, dataset, desc=f"extract {split} features", **extract_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": feats.contiguous(), "targets": targets}, tmp, metadata={"key": json.dumps(key_doc)})
    tmp.replace(path)  # atomic: an interrupted extraction never leaves a truncated cache behind
    return feats, targets, False
