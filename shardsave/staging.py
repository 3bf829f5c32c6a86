"""Staging buffers for non-blocking saves: a private copy of what this rank writes.

Buffers are kept between saves and reused when a key keeps its shape and dtype, so a
training loop that checkpoints the same variables pays for one ``np.copyto`` per save and
allocates nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


class StagingBuffers:
    def __init__(self) -> None:
        self._buffers: dict[Hashable, np.ndarray] = {}

    def stage(self, items: Sequence[tuple[Hashable, np.ndarray]]) -> list[tuple[Hashable, np.ndarray]]:
        """Copy every ``(key, array)``; return the copies, in the same order."""
        staged = []
        keep: dict[Hashable, np.ndarray] = {}
        for key, array in items:
            if array.dtype.kind == "O":
                copy = array.copy()  # bytes objects are immutable: a shallow copy is a copy
            else:
                copy = self._buffers.get(key)
                if copy is None or copy.shape != array.shape or copy.dtype != array.dtype:
                    copy = np.empty_like(array, order="C")
                np.copyto(copy, array)
            keep[key] = copy
            staged.append((key, copy))
        self._buffers = keep
        return staged
