"""Staging buffers for non-blocking saves: a private copy of what this rank writes.

Buffers are kept between saves and reused when a key keeps its shape and dtype, so a
training loop that checkpoints the same variables pays for one ``np.copyto`` per save and
allocates nothing. When the caller vouches that the arrays are the same list as last
time (same order, shapes and dtypes: the Saver's cached layout), the copy is a single
``map(np.copyto, ...)`` with no per-array bookkeeping, as cheap as a plain copy loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


class StagingBuffers:
    def __init__(self) -> None:
        self._buffers: dict[Hashable, np.ndarray] = {}
        self._aligned: list[np.ndarray] = []
        self._token: object = None

    def restage(self, token: object, arrays: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Copy ``arrays`` into the buffers of the last ``stage`` made with this ``token``
        (an object standing for this exact list of shapes and dtypes), in order, without
        looking anything up; None if the last staging was not for this token."""
        if token is None or token is not self._token or len(self._aligned) != len(arrays):
            return None
        for _ in map(np.copyto, self._aligned, arrays):
            pass
        return list(self._aligned)

    def stage(
        self, keys: Sequence[Hashable], arrays: Sequence[np.ndarray], token: object = None
    ) -> list[np.ndarray]:
        """Copies of ``arrays`` (one per key), in the same order; buffers of keys whose
        shape and dtype are unchanged are reused."""
        staged = []
        keep: dict[Hashable, np.ndarray] = {}
        for key, array in zip(keys, arrays, strict=True):
            if array.dtype.kind == "O":
                copy = array.copy()  # bytes objects are immutable: a shallow copy is a copy
            else:
                copy = self._buffers.get(key)
                if copy is None or copy.shape != array.shape or copy.dtype != array.dtype:
                    copy = np.empty_like(array, order="C")
                np.copyto(copy, array)
            keep[key] = copy
            staged.append(copy)
        self._buffers, self._aligned, self._token = keep, staged, token
        return list(staged)
