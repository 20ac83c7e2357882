"""Which batch sizes to expect: one rule for the batch-size histogram's buckets, the CPU warm-up and the batch sizes
a compiled forward is specialised for."""

from __future__ import annotations


def pow2_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below the largest batch the batcher can form, then that largest batch itself: the batch-size
    histogram's buckets, the sizes a CPU warm-up runs, and the shapes a compiled forward sees (each batch padded up
    to the next one: at most twice the work for a batch just past a power of two, in exchange for log2(N) + 1
    compilations instead of N)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]


def bucket_for(batch_size: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `batch_size` images (buckets sorted ascending, as pow2_batch_sizes makes
    them); ValueError past the largest one."""
    for bucket in buckets:
        if bucket >= batch_size:
            return bucket
    raise ValueError(f"a batch of {batch_size} is larger than the largest bucket, {buckets[-1]}")
