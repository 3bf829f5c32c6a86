"""Block layouts of 2-D variables over the ranks of a communicator, for the MPI tests."""

from __future__ import annotations

import ml_dtypes
import numpy as np

LAYOUTS = ("rows", "uneven", "cols", "grid", "replicated")


def _split(n: int, parts: int, weights=None) -> list[tuple[int, int]]:
    """(start, length) of each part; uneven when weights are given."""
    if weights is None:
        sizes = [len(a) for a in np.array_split(np.arange(n), parts)]
    else:
        w = np.asarray(weights, float)
        sizes = np.floor(n * w / w.sum()).astype(int)
        sizes[-1] += n - sizes.sum()
        sizes = sizes.tolist()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return list(zip(starts, sizes, strict=True))


def _grid(size: int) -> tuple[int, int]:
    a = int(np.sqrt(size))
    while size % a:
        a -= 1
    return size // a, a


def block(layout: str, shape: tuple[int, int], rank: int, size: int):
    """``(offset, block_shape)`` of ``rank``'s block, or None if it holds nothing."""
    rows, cols = shape
    if layout == "replicated":
        return (0, 0), (rows, cols)
    if layout == "rows":
        (r0, nr), (c0, nc) = _split(rows, size)[rank], (0, cols)
    elif layout == "uneven":
        (r0, nr), (c0, nc) = _split(rows, size, weights=range(1, size + 1))[rank], (0, cols)
    elif layout == "cols":
        (r0, nr), (c0, nc) = (0, rows), _split(cols, size)[rank]
    elif layout == "grid":
        a, b = _grid(size)
        (r0, nr), (c0, nc) = _split(rows, a)[rank // b], _split(cols, b)[rank % b]
    else:
        raise ValueError(layout)
    if nr == 0 or nc == 0:
        return None
    return (r0, c0), (nr, nc)


def global_value(name: str, shape, dtype) -> np.ndarray:
    """The deterministic whole value of a test variable."""
    n = int(np.prod(shape))
    seed = sum(name.encode())
    base = (np.arange(n, dtype=np.float64) * 0.5 + seed).reshape(shape)
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return base.astype(np.float32).astype(ml_dtypes.bfloat16)
    return base.astype(dtype)


# name -> (global shape, dtype, layout at save time)
SAVED = {
    "rows": ((13, 7), np.float32, "rows"),
    "uneven": ((13, 7), np.float64, "uneven"),
    "cols": ((6, 11), np.int32, "cols"),
    "grid": ((9, 10), np.float32, "grid"),
    "repl": ((5, 3), np.float32, "replicated"),
    "tiny": ((2, 3), np.int64, "rows"),
    "bf16": ((8, 4), ml_dtypes.bfloat16, "rows"),
    "big": ((4096, 256), np.float32, "rows"),
}
