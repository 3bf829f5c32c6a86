"""Nested state ("pytrees"): a Saver given dicts, lists and tuples of arrays.

Each leaf is saved under its path joined with ``/``: ``{"model": {"dense": {"kernel": k}}}``
gives ``model/dense/kernel``, list and tuple items their index (``opt/state/0/exp_avg``),
so ``model.state_dict()`` and ``optimizer.state_dict()`` go in as they are. The leaves:

- numpy arrays that are writable, torch CPU tensors: saved from and restored into their
  own memory (any strides), so in-place updates are saved and the restored tree holds the
  same objects;
- JAX arrays, read-only numpy arrays: saved as they are; restored as new arrays;
- Python ``bool``/``int``/``float``/``complex``/``str``/``bytes`` and numpy scalars: saved
  as 0-d tensors (int64, float64, ..., string), restored as the same Python or numpy type;
- ``None`` (e.g. an optimizer's ``foreach``): not saved, restored as None;
- ``ss.Variable`` / ``ss.PartitionedVariable`` (saved under the path, not their names),
  and ``ss.PerRank(leaf)`` (per_rank.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from . import leaves
from .errors import InvalidArgumentError
from .format.names import METADATA_NAME
from .per_rank import PerRank, RankRow
from .variables import PartitionedVariable, Variable

_SCALARS = (bool, int, float, complex, str, bytes, np.generic)


def is_tree(var_list: Any) -> bool:
    """A ``var_list`` that is not one of TF's forms (a list of Variables, or a mapping of
    names to Variables, PartitionedVariables or lists of parts) is a tree."""
    if isinstance(var_list, Mapping):
        return not all(_tf_value(v) for v in var_list.values())
    if isinstance(var_list, list | tuple):
        return not all(isinstance(v, Variable | PartitionedVariable) for v in var_list)
    # a lone array: TreeState explains that a tree is a container
    return isinstance(var_list, np.ndarray | PerRank) or leaves.is_torch(var_list) or leaves.is_jax(var_list)


def _tf_value(v: Any) -> bool:
    if isinstance(v, Variable | PartitionedVariable):
        return True
    return isinstance(v, list | tuple) and all(isinstance(p, Variable) for p in v)


def _key_name(key: Any, path: str) -> str:
    if isinstance(key, str):
        if not key or key.startswith("/") or key.endswith("/"):
            raise InvalidArgumentError(
                f"tree key {key!r} under {path or 'the root'!r}: a key must be non-empty and must not "
                "begin or end with '/' (leaves are named by their keys joined with '/')"
            )
        return key
    if isinstance(key, int | np.integer) and not isinstance(key, bool | np.bool_):
        return str(int(key))
    raise InvalidArgumentError(
        f"tree key {key!r} ({type(key).__name__}) under {path or 'the root'!r}: keys must be strings "
        "or integers, which name the leaves"
    )


def walk(tree: Any) -> Iterator[tuple[str, Any]]:
    """``(name, leaf)`` of every leaf, depth first; InvalidArgumentError for keys that
    cannot name a leaf."""
    for name, value, _ in _walk(tree, "", ()):
        yield name, value


def _walk(tree: Any, path: str, keys: tuple) -> Iterator[tuple[str, Any, tuple]]:
    """:func:`walk`, with the keys that lead from the root to each leaf."""
    if isinstance(tree, Mapping):
        items = ((_key_name(k, path), v, k) for k, v in tree.items())
    elif isinstance(tree, list | tuple):
        items = ((str(i), v, i) for i, v in enumerate(tree))
    else:
        yield path, tree, keys
        return
    for key, value, raw in items:
        yield from _walk(value, f"{path}/{key}" if path else key, (*keys, raw))


_NOT_A_LEAF = object()


def refill(tree: Any, leaf_at: Callable[[str], Any], path: str = "") -> Any:
    """``tree`` with each leaf replaced by ``leaf_at(its name)`` (or kept where that gives
    ``_NOT_A_LEAF``): dicts and lists are updated in place, so the caller's containers hold
    the new values; tuples and other mappings are rebuilt, as the same types, where an
    item changed."""
    if path:
        value = leaf_at(path)
        if value is not _NOT_A_LEAF:
            return value
    if isinstance(tree, Mapping):
        new = {k: refill(v, leaf_at, f"{path}/{_key_name(k, path)}" if path else _key_name(k, path))
               for k, v in tree.items()}  # fmt: skip
        changed = {k: v for k, v in new.items() if v is not tree[k]}
        if not changed:
            return tree
        if isinstance(tree, dict):
            tree.update(changed)
            return tree
        try:
            return type(tree)(new)
        except TypeError:  # a mapping type without dict's constructor
            return new
    if isinstance(tree, list | tuple):
        items = [refill(v, leaf_at, f"{path}/{i}" if path else str(i)) for i, v in enumerate(tree)]
        if all(a is b for a, b in zip(items, tree, strict=True)):
            return tree
        if isinstance(tree, list):
            tree[:] = items
            return tree
        if hasattr(tree, "_fields"):  # a namedtuple
            return type(tree)(*items)
        return tuple(items) if type(tree) is tuple else type(tree)(items)
    return tree


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
        if isinstance(var, _Live) and (self.inner_kind if self.kind == "per_rank" else self.kind) in _LIVE:
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
        if kind == "scalar" and isinstance(current, _SCALARS):
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
        if new_kind not in _LIVE or new is None or new.dtype != var.dtype or new.shape != var.shape:
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
        if isinstance(value, _SCALARS):
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


_LIVE = ("shared", "array", "jax", "scalar")
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


class TreeState:
    """The state a Saver was given as a tree (``saver.state``).

    ``restored()`` is the tree as it is now: after ``saver.restore`` the restored values,
    mutable leaves being the same objects filled in place and the others new values of the
    same types. ``assign(tree)`` gives the state new values from a tree of the same
    structure: copied into the leaves' memory, adopted for JAX arrays.
    """

    def __init__(self, tree: Any):
        if not isinstance(tree, Mapping | list | tuple):
            raise InvalidArgumentError(
                f"a tree must be a dict, list or tuple of arrays, not {type(tree).__name__}"
            )
        self._tree = tree
        self._leaves: dict[str, Leaf] = {}
        for name, value, keys in _walk(tree, "", ()):
            if not name:
                raise InvalidArgumentError("a tree leaf has an empty name")
            if name == METADATA_NAME:
                raise InvalidArgumentError(f"tree leaf {name!r}: the name is reserved for the metadata")
            if name in self._leaves:
                raise InvalidArgumentError(
                    f"two leaves of the tree are named {name!r} (a key with '/' in it collides "
                    "with a nested path): rename one"
                )
            self._leaves[name] = Leaf(name, value, tree, keys)

    @property
    def names(self) -> list[str]:
        """The names of the saved leaves (None leaves are not saved)."""
        return [n for n, leaf in self._leaves.items() if leaf.blocks]

    def saveables(self) -> dict[str, list[Variable]]:
        return {n: leaf.blocks for n, leaf in self._leaves.items() if leaf.blocks}

    def bind(self, rank: int, size: int) -> None:
        """Give the per-rank leaves the Saver's rank and number of ranks."""
        for leaf in self._leaves.values():
            for block in leaf.blocks:
                if isinstance(block, RankRow):
                    block.bind(rank, size)

    def assign(self, tree: Any) -> None:
        """Give every leaf its value in ``tree`` (same structure; None leaves stay None).
        Checked first: on an error no leaf has changed."""
        given = dict(walk(tree))
        missing = [n for n in self._leaves if n not in given]
        extra = [n for n in given if n not in self._leaves]
        if missing or extra:
            raise InvalidArgumentError(
                "assign: the tree has another structure than the Saver's"
                + (f"; missing {missing[:5]}" if missing else "")
                + (f"; not in the Saver's {extra[:5]}" if extra else "")
            )
        for name, leaf in self._leaves.items():
            _check_assignable(leaf, given[name])
        for name, leaf in self._leaves.items():
            leaf.assign(given[name])

    def restored(self) -> Any:
        return refill(self._tree, self._restored_leaf)

    def _restored_leaf(self, name: str) -> Any:
        leaf = self._leaves.get(name)
        if leaf is None:
            return _NOT_A_LEAF
        value = leaf.restored()
        if leaf.kind in _LIVE:  # what the caller's tree holds now
            leaf.seen = value
            if leaf.kind != "scalar":
                leaf.original = value
        return value


def _check_assignable(leaf: Leaf, value: Any) -> None:
    """The checks of ``leaf.assign``, before anything is written."""
    if isinstance(value, PerRank):
        value = value.value
    inner = leaf.per_rank.value if leaf.kind == "per_rank" else leaf.original
    if value is inner or value is leaf.original:
        return
    kind = leaf.inner_kind if leaf.kind == "per_rank" else leaf.kind
    if kind == "none" and value is not None:
        raise InvalidArgumentError(
            f"tree leaf {leaf.name!r} was None when the Saver was made, so it is not saved: "
            "the structure of the tree must stay the same"
        )
    if kind in ("variable", "partitioned"):
        raise InvalidArgumentError(
            f"tree leaf {leaf.name!r} is a Variable: assign to it, rather than put another in the tree"
        )
    if leaf.var is None:
        return
    view = leaves.numpy_view(value, f"tree leaf {leaf.name!r}")
    shape = np.shape(value) if view is None else view.shape
    if tuple(shape) != tuple(leaf.var.shape):
        raise InvalidArgumentError(
            f"tree leaf {leaf.name!r}: cannot assign shape {list(shape)} to shape {list(leaf.var.shape)}"
        )
