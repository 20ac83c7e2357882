"""Which batch sizes to expect: one rule for the batch-size histogram's buckets and the CPU warm-up."""

from __future__ import annotations


def pow2_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below the largest batch the batcher can form, then that largest batch itself: the batch-size
    histogram's buckets, and the sizes a CPU warm-up runs."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]
