"""Which batch sizes to expect: one rule for the batch-size histogram's buckets, the CPU warm-up and the batch sizes
a compiled forward is specialised for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the metrics module imports this file without needing torch
    import torch


def pow2_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below the largest batch the batcher can form, then that largest batch itself: the batch-size
    histogram's buckets, the sizes a CPU warm-up runs, and the shapes a compiled forward sees (log2(N) + 1
    compilations instead of N; each batch split into buckets on a CPU, padded up to one on a GPU: see
    model/inference.py)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]


def bucket_split(batch_size: int, buckets: list[int]) -> list[int]:
    """`batch_size` as a sum of buckets, largest first (13 -> [8, 4, 1] for buckets 1, 2, 4, 8): the chunks a CPU runs
    a compiled forward on, so that no padding row is computed. Needs bucket 1, which pow2_batch_sizes always has."""
    if not buckets or buckets[0] != 1:
        raise ValueError(f"splitting into buckets needs a bucket of 1, got {buckets}")
    sizes, left = [], batch_size
    for bucket in reversed(buckets):
        while left >= bucket:
            sizes.append(bucket)
            left -= bucket
    return sizes


def bucket_for(batch_size: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `batch_size` images (buckets sorted ascending, as pow2_batch_sizes makes
    them); ValueError past the largest one."""
    for bucket in buckets:
        if bucket >= batch_size:
            return bucket
    raise ValueError(f"a batch of {batch_size} is larger than the largest bucket, {buckets[-1]}")


def warmup_sizes(max_batch_size: int, policy: str, device: torch.device, buckets: list[int] | None = None) -> list[int]:
    """Batch sizes to warm. The batcher can form every size 1..max_batch_size; on accelerators each size may get
    its own kernels, so warm them all ("all"); on CPU the cost grows as N^2/2 images and kernels hardly depend on
    B, so powers of two plus the maximum ("pow2") is enough to grow the allocator and build oneDNN primitives.

    A compiled classifier's `buckets` are warmed whatever the policy, "none" included: each is a compilation of
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
