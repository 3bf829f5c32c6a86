"""TF's variable partitioners: ``partitioner(shape, dtype) -> partitions per axis``.

And :func:`partition_blocks`, which turns that into the blocks TF would make: along the
split axis the first ``size % n`` parts are one row larger (TF's ``_iter_slices``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .plan import Block

Partitioner = Callable[..., list[int]]


def fixed_size_partitioner(num_shards: int, axis: int = 0) -> Partitioner:
    def partitioner(shape, dtype=np.float32) -> list[int]:
        partitions = [1] * len(shape)
        partitions[axis] = min(num_shards, shape[axis]) if shape[axis] else 1
        return partitions

    return partitioner


def variable_axis_size_partitioner(
    max_shard_bytes: int, axis: int = 0, bytes_per_string_element: int = 16, max_shards: int | None = None
) -> Partitioner:
    if max_shard_bytes < 1 or bytes_per_string_element < 1:
        raise ValueError("max_shard_bytes and bytes_per_string_element must be positive")

    def partitioner(shape, dtype=np.float32) -> list[int]:
        dtype = np.dtype(dtype)
        elem = bytes_per_string_element if dtype.kind in "OSU" else dtype.itemsize
        slice_bytes = elem * math.prod(d for i, d in enumerate(shape) if i != axis)
        slices_per_shard = max(1, max_shard_bytes // max(1, slice_bytes))
        shards = math.ceil(shape[axis] / slices_per_shard) if shape[axis] else 1
        if max_shards:
            shards = min(shards, max_shards)
        partitions = [1] * len(shape)
        partitions[axis] = max(1, min(shards, shape[axis] or 1))
        return partitions

    return partitioner


def min_max_variable_partitioner(
    max_partitions: int = 1,
    axis: int = 0,
    min_slice_size: int = 256 << 10,
    bytes_per_string_element: int = 16,
) -> Partitioner:
    def partitioner(shape, dtype=np.float32) -> list[int]:
        dtype = np.dtype(dtype)
        elem = bytes_per_string_element if dtype.kind in "OSU" else dtype.itemsize
        total = math.prod(shape) * elem
        slices = max(1, min(max_partitions, shape[axis], math.ceil(total / min_slice_size)))
        partitions = [1] * len(shape)
        partitions[axis] = int(slices)
        return partitions

    return partitioner


def partition_blocks(shape: Sequence[int], partitions: Sequence[int]) -> list[Block]:
    """The blocks of a partitioned variable, in TF's part order (row-major over the grid)."""
    shape = tuple(int(d) for d in shape)
    if len(partitions) != len(shape):
        raise ValueError(f"partitions {list(partitions)} do not match shape {list(shape)}")
    per_axis = []
    for size, n in zip(shape, partitions, strict=True):
        base, extra = divmod(size, n)
        cuts, start = [], 0
        for i in range(n):
            length = base + (1 if i < extra else 0)
            cuts.append((start, length))
            start += length
        per_axis.append(cuts)
    blocks = [Block((), ())]
    for cuts in per_axis:
        blocks = [Block(b.offset + (s,), b.shape + (n,)) for b in blocks for s, n in cuts]
    return blocks
