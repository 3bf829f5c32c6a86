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

The Saver follows the tree: each save and restore looks up every leaf by its keys from the
root, so objects the caller put in the tree since (``state["epoch"] = 4``, a new params
dict) are the ones saved (tree_leaf.py); a restore puts the values back into the caller's
dicts and lists (:func:`refill`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from . import leaves
from .errors import InvalidArgumentError
from .format.names import METADATA_NAME
from .per_rank import PerRank, RankRow
from .tree_leaf import LIVE, Leaf
from .variables import PartitionedVariable, Variable


def is_tree(var_list: Any) -> bool:
    """A ``var_list`` that is not one of TF's forms (a list of Variables, or a mapping of
    names to Variables, PartitionedVariables or lists of parts) is a tree."""
    if isinstance(var_list, Mapping):
        return not all(_tf_value(v) for v in var_list.values())
    if isinstance(var_list, list | tuple):  # by type, once per type: lists of 20,000 are common
        return not all(issubclass(t, Variable | PartitionedVariable) for t in set(map(type, var_list)))
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


def _walk(
    tree: Any, path: str, keys: tuple, above: frozenset = frozenset()
) -> Iterator[tuple[str, Any, tuple]]:
    """:func:`walk`, with the keys that lead from the root to each leaf (``above``: the
    ids of the containers on the way, against a tree that contains itself)."""
    if isinstance(tree, Mapping):
        items = ((_key_name(k, path), v, k) for k, v in tree.items())
    elif isinstance(tree, list | tuple):
        items = ((str(i), v, i) for i, v in enumerate(tree))
    else:
        yield path, tree, keys
        return
    if id(tree) in above:
        raise InvalidArgumentError(f"tree node {path!r} contains itself (a cycle): a tree must be finite")
    above = above | {id(tree)}
    for key, value, raw in items:
        yield from _walk(value, f"{path}/{key}" if path else key, (*keys, raw), above)


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
        if leaf.kind in LIVE:  # what the caller's tree holds now
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
