"""Initializers: callables ``init(shape, dtype) -> ndarray``, as in ``tf.compat.v1``.

Each may be passed bare (``initializer=zeros_initializer``) or called first
(``initializer=zeros_initializer()``), as TF code does both. Random initializers draw the
whole variable from their seed and hand out slices, so a partitioned variable gets the
same values whatever the partitioning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Initializer = Callable[..., np.ndarray]


def _shape(shape: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(int(d) for d in shape) if shape is not None else ()


def zeros_initializer(shape=None, dtype=np.float32, **_) -> np.ndarray | Initializer:
    if shape is None:
        return zeros_initializer
    return np.zeros(_shape(shape), dtype=dtype)


def ones_initializer(shape=None, dtype=np.float32, **_) -> np.ndarray | Initializer:
    if shape is None:
        return ones_initializer
    return np.ones(_shape(shape), dtype=dtype)


def constant_initializer(value=0) -> Initializer:
    """Fill with ``value``: a scalar, or an array of exactly the variable's shape."""

    def init(shape=None, dtype=np.float32, **_) -> np.ndarray:
        arr = np.asarray(value)
        if arr.ndim == 0:
            return np.full(_shape(shape), arr, dtype=dtype)
        if arr.size != int(np.prod(_shape(shape))):
            raise ValueError(
                f"constant_initializer value has {arr.size} elements, shape {list(_shape(shape))} "
                f"needs {int(np.prod(_shape(shape)))}"
            )
        return arr.astype(dtype).reshape(_shape(shape))

    return init


def random_normal_initializer(mean: float = 0.0, stddev: float = 1.0, seed: int | None = None) -> Initializer:
    def init(shape=None, dtype=np.float32, **_) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.normal(mean, stddev, size=_shape(shape)).astype(dtype)

    return init


def random_uniform_initializer(
    minval: float = -0.05, maxval: float = 0.05, seed: int | None = None
) -> Initializer:
    def init(shape=None, dtype=np.float32, **_) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.uniform(minval, maxval, size=_shape(shape)).astype(dtype)

    return init
