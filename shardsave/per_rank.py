"""Per-rank state (an RNG state, a data iterator's position): one value per rank, saved
under one name with a leading rank axis.

Rank ``r`` of ``n`` saves its value of shape ``S`` as row ``r`` of a tensor of shape
``(n, *S)`` (TensorFlow reads it as such), and a restore on ``n`` ranks gives each rank its
own row back. On another number of ranks there is no "own row": the restore raises
FailedPreconditionError, unless the value was wrapped with ``on_resize="all_rows"``, in
which case every rank gets the whole ``(n_saved, *S)`` array (``PerRank.rows``, and in the
tree ``Saver.restore`` returns) and its own value stays as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import FailedPreconditionError, InvalidArgumentError
from .variables import Variable

ON_RESIZE = ("error", "all_rows")


class PerRank:
    """Marks a value in a Saver's tree (or a Variable in a ``var_list`` mapping) as per-rank:
    ``ss.Saver({"model": params, "rng": ss.PerRank(rng_state)})``. ``value`` is any leaf a
    tree takes (a numpy array, a torch tensor, a JAX array, a Python or numpy scalar) or a
    Variable. ``rows`` is None, or after a restore on another number of ranks with
    ``on_resize="all_rows"`` the array of every saved rank's row."""

    def __init__(self, value: Any, *, on_resize: str = "error"):
        if on_resize not in ON_RESIZE:
            raise InvalidArgumentError(f"PerRank: on_resize must be one of {ON_RESIZE}, not {on_resize!r}")
        if isinstance(value, PerRank):
            raise InvalidArgumentError("PerRank: the value is already per-rank")
        self.value = value
        self.on_resize = on_resize
        self.rows: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"PerRank({self.value!r}, on_resize={self.on_resize!r})"


class RankRow(Variable):
    """This rank's row of a per-rank variable: the block ``(1, *S)`` at ``(rank, 0, ...)``
    of ``(size, *S)``, over the memory of ``inner`` (the rank's own value) at every moment.
    ``bind`` sets the rank and size (the Saver's communicator)."""

    def __init__(self, inner: Variable, wrapper: PerRank):  # noqa: D107 (no Variable.__init__: a view)
        if inner.is_sliced:
            raise InvalidArgumentError(
                f"per-rank variable {inner.name!r}: a per-rank value is whole on its rank, not a block"
            )
        self.inner, self.wrapper = inner, wrapper
        self.name, self.trainable, self.dtype = inner.name, False, inner.dtype
        self._all_rows: np.ndarray | None = None
        self.bind(0, 1)

    def bind(self, rank: int, size: int) -> None:
        s = self.inner.shape
        self.shape, self.global_shape, self.offset = (1, *s), (size, *s), (rank,) + (0,) * len(s)
        self.size = size

    @property
    def _value(self) -> np.ndarray | None:  # a view whatever the strides: restore writes into it
        value = self.inner._value
        return None if value is None else np.expand_dims(value, 0)

    @property
    def _shared(self) -> bool:
        return self.inner._shared

    def assign(self, value: Any) -> RankRow:
        self.inner.assign(value)
        return self

    def rows_target(self, prefix: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The array a restore reads every row into, when the checkpoint's shape is not this
        job's ``(size, *S)``; or the reason it cannot."""
        s = self.inner.shape
        if len(shape) != len(s) + 1 or tuple(shape[1:]) != s:
            raise InvalidArgumentError(
                f"{prefix}: per-rank variable {name!r} has rows of shape {list(s)}, the checkpoint "
                f"holds shape {list(shape)}"
            )
        if self.wrapper.on_resize != "all_rows":
            raise FailedPreconditionError(
                f"{prefix}: per-rank variable {name!r} was saved on {shape[0]} ranks, this job has "
                f"{self.size}: a rank's own row exists only on {shape[0]} ranks (wrap the value in "
                f"PerRank(..., on_resize='all_rows') to get all {shape[0]} rows)"
            )
        self._all_rows = np.empty(shape, dtype=dtype)
        return self._all_rows

    def _check_set(self, arr: np.ndarray) -> None:
        if arr is not self._all_rows:
            self.inner._check_set(arr[0])

    def _set(self, arr: np.ndarray) -> None:
        if arr is self._all_rows:  # every saved row, on another number of ranks
            self.wrapper.rows, self._all_rows = arr, None
        else:
            self.inner._set(arr[0])
            self.wrapper.rows = None

    def __repr__(self) -> str:
        return f"<shardsave per-rank row {self.name!r} of {list(self.global_shape)} at {list(self.offset)}>"
