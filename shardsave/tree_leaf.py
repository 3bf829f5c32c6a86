"""One leaf of a Saver's tree: the variable that saves it, the object the caller keeps in
its place (followed at each save and restore), and its restored value as the type it had.

The kinds: ``shared`` (a writable numpy array or a torch tensor, saved from and restored
into its memory), ``array`` (read-only numpy: held; restored as a new array), ``jax``
(held as ``np.asarray``; restored as a new JAX array), ``scalar`` (a Python or numpy
scalar as a 0-d array; restored as the same type), ``none`` (not saved), ``variable`` and
``partitioned`` (the caller's own), ``per_rank`` (a PerRank around one of the others).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import leaves
from .errors import InvalidArgumentError
from .per_rank import PerRank, RankRow
from .variables import PartitionedVariable, Variable

SCALARS = (bool, int, float, complex, str, bytes, np.generic)


class Leaf:
    """One leaf: the variable(s) that save it and how its restored value is given back."""

    def __init__(self, name: str, value: Any, root: Any = None, keys: tuple = ()):
        self.name, self.original = name, value
        self.root, self.keys, self.seen = root, keys, value  # where the caller keeps it, what was there
        self.kind, self.blocks = "", []
        self.per_rank: PerRank | None = None
        self.inner_kind = ""  # of a PerRank's value
        self._jax: tuple[np.ndarray, Any] | None = None  # (the array it holds, that as a JAX array)
        inner = value.value if isinstance(value, PerRank) else value
        var = self._variable(inner)
        if isinstance(value, PerRank) and (var is None or self.kind == "partitioned"):
            raise InvalidArgumentError(
                f"tree leaf {name!r}: PerRank holds a value of this rank, not {type(inner).__name__}"
            )
        if isinstance(value, PerRank):
            self.per_rank = value
            self.inner_kind = self.kind
            self.kind = "per_rank"
            self.blocks = [RankRow(var, value)]
        elif var is not None:
            self.blocks = list(value.parts) if isinstance(value, PartitionedVariable) else [var]
        if isinstance(var, _Live) and (self.inner_kind if self.kind == "per_rank" else self.kind) in LIVE:
            var._leaf = self
            self.seen = inner
        self.var = var

    def follow(self) -> None:
        """If the caller put another object in the leaf's place (``state["epoch"] = 4``, a
        new array), save and restore that one: it must have the dtype and shape of the
        first (a Python number is cast to it)."""
        if self.root is None:
            return
        current = self.root
        try:
            for key in self.keys:
                current = current[key]
        except Exception:  # noqa: BLE001 (a KeyError, an IndexError, a leaf where a container was)
            raise InvalidArgumentError(f"tree leaf {self.name!r} is no longer in the Saver's tree") from None
        kind = self.kind
        if kind == "per_rank":  # the caller may put another PerRank there (an iterator's new position)
            if not isinstance(current, PerRank):
                raise InvalidArgumentError(
                    f"tree leaf {self.name!r} was a PerRank: put a PerRank in its place, not a "
                    f"{type(current).__name__}"
                )
            if current is not self.per_rank:
                self.per_rank = self.blocks[0].wrapper = current
            current, kind = current.value, self.inner_kind
        if current is self.seen:
            return
        var = self.var
        if kind == "scalar" and isinstance(current, SCALARS):
            arr = _scalar_array(current, f"tree leaf {self.name!r}")
            if arr.dtype != var.dtype and np.can_cast(arr.dtype, var.dtype, "same_kind"):
                arr = arr.astype(var.dtype)
            new, new_kind = _holding(self.name, arr), kind
        else:
            saved_kind = self.kind
            try:
                new = self._variable(current)
                new_kind = self.kind
            finally:
                self.kind = saved_kind
        if new_kind not in LIVE or new is None or new.dtype != var.dtype or new.shape != var.shape:
            got = f"{new.dtype}{list(new.shape)}" if new is not None else type(current).__name__
            raise InvalidArgumentError(
                f"tree leaf {self.name!r} was replaced by a {got}; the Saver was made with a "
                f"{var.dtype}{list(var.shape)}: give a value of that dtype and shape, or make a new Saver"
            )
        var._arr, var._shared = new._arr, new._shared
        self.seen, self._jax = current, None
        if self.kind == "per_rank":
            self.inner_kind = new_kind
        else:
            self.kind = new_kind
            if new_kind != "scalar":  # a scalar comes back as the type the Saver was made with
                self.original = current

    def _variable(self, value: Any) -> Variable | None:
        what = f"tree leaf {self.name!r}"
        if value is None:
            self.kind = "none"
            return None
        if isinstance(value, Variable):
            self.kind = "variable"
            return value
        if isinstance(value, PartitionedVariable):
            self.kind = "partitioned"
            return value.parts[0] if value.parts else None
        if isinstance(value, np.ndarray) or leaves.is_torch(value):
            view = leaves.numpy_view(value, what)
            if leaves.shareable(view, strided=True):
                self.kind = "shared"
                return _Live._sharing(self.name, view)
            self.kind = "array"  # read-only: held as it is; object arrays (strings) are copied
            if view.dtype.hasobject:
                return _Live(self.name, view, register=False, copy=True)
            return _holding(self.name, view)
        if leaves.is_jax(value):
            self.kind = "jax"
            return _holding(self.name, leaves.jax_view(value, what))
        if isinstance(value, SCALARS):
            self.kind = "scalar"
            return _holding(self.name, _scalar_array(value, what))
        raise InvalidArgumentError(
            f"{what} is a {type(value).__module__}.{type(value).__qualname__}: a tree's leaves are numpy "
            "arrays, torch CPU tensors, JAX arrays, Python or numpy scalars, None, Variables or PerRank"
        )

    def assign(self, value: Any) -> None:
        kind = self.inner_kind if self.kind == "per_rank" else self.kind
        if isinstance(value, PerRank) and self.kind == "per_rank":
            value = value.value
        if value is self.original or (self.kind == "per_rank" and value is self.per_rank.value):
            return
        if kind in ("none", "variable", "partitioned"):  # checked: the same object, or None
            return
        if kind == "jax":
            src = leaves.jax_view(value, f"tree leaf {self.name!r}") if leaves.is_jax(value) else None
            arr = np.asarray(value) if src is None else src
            if arr.shape != self.var.shape or arr.dtype != self.var.dtype:
                raise InvalidArgumentError(
                    f"tree leaf {self.name!r}: cannot assign {arr.dtype}{list(arr.shape)} to "
                    f"{self.var.dtype}{list(self.var.shape)}"
                )
            self.var._value = arr
            self._jax = (arr, value) if src is not None else None
            return
        if kind == "scalar":
            value = _scalar_array(value, f"tree leaf {self.name!r}")
        self.var.assign(value)

    def restored(self) -> Any:
        """The leaf's value now; a PerRank comes back as itself, its ``value`` restored."""
        if isinstance(self.var, _Live) and self.var._leaf is self:
            self.follow()
        if self.kind == "per_rank":
            wrapper = self.per_rank
            wrapper.value = self.seen = self._restored(self.inner_kind, wrapper.value)
            return wrapper
        return self._restored(self.kind, self.original)

    def _restored(self, kind: str, original: Any) -> Any:
        if kind in ("shared", "none", "variable", "partitioned"):
            return original
        value = self.var.value
        if kind == "array":
            return value
        if kind == "jax":
            if self._jax is None or self._jax[0] is not value:
                self._jax = (value, leaves.to_jax(original, value))
            return self._jax[1]
        return _python_value(original, value)


class _Live(Variable):
    """A tree leaf's variable: before a save or a restore uses its array, it looks whether
    the caller put another object in the leaf's place (:meth:`Leaf.follow`)."""

    _leaf: Leaf | None = None
    _arr: np.ndarray | None = None

    @property
    def _value(self) -> np.ndarray | None:
        if self._leaf is not None:
            self._leaf.follow()
        return self._arr

    @_value.setter
    def _value(self, arr: np.ndarray | None) -> None:
        self._arr = arr

    def _check_set(self, arr: np.ndarray) -> None:  # a restore: first the object the tree holds now
        if self._leaf is not None:
            self._leaf.follow()
        super()._check_set(arr)

    def _set(self, arr: np.ndarray) -> None:
        if self._leaf is not None:
            self._leaf.follow()
        super()._set(arr)


LIVE = ("shared", "array", "jax", "scalar")
"""The kinds of leaves followed in their slots (a Variable or a PerRank is the caller's own)."""


def _holding(name: str, arr: np.ndarray) -> Variable:
    """A variable holding ``arr`` itself, not shared (a restore gives it a new array)."""
    var = _Live(name, dtype=arr.dtype, shape=arr.shape, register=False)
    var._value = arr
    return var


def _scalar_array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, bool | np.bool_):
        return np.array(value, np.bool_)
    if isinstance(value, int) and not isinstance(value, np.generic):
        try:
            return np.array(np.int64(value))
        except OverflowError:
            raise InvalidArgumentError(f"{what}: the int {value} does not fit in an int64") from None
    if isinstance(value, str | bytes):
        return np.array(value, object)
    return np.array(value)


def _python_value(original: Any, arr: np.ndarray) -> Any:
    """The restored 0-d ``arr`` as the type of the leaf it came from."""
    item = arr[()]
    if isinstance(original, str):
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    if isinstance(original, bytes):
        return item if isinstance(item, bytes) else str(item).encode("utf-8")
    if isinstance(original, np.generic):
        return np.asarray(arr, dtype=original.dtype)[()]
    return type(original)(item)
