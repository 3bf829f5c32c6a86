"""What a restore reads into: for each of this rank's variables, a fresh array, the
variable's own array (in place), or a whole small tensor read in bulk."""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import InvalidArgumentError, NotFoundError
from ..format import dtypes
from ..format.index import Index
from ..per_rank import RankRow
from ..plan import Block
from ..variables import Variable
from .checks import check_shape, stored_dtype
from .reads import Target
from .small import is_small_plain, small_plain_rows

if TYPE_CHECKING:
    from ..save.layout import SaveLayout


class Found(NamedTuple):
    """What a restore reads, and into what (:func:`targets`)."""

    fresh: list[Target]  # into new arrays, adopted by ``updates``' variables at the end
    updates: list[tuple[Variable, np.ndarray]]
    live: list[Target]  # into the variables' own arrays, in two passes (in_place.py)
    small_names: list[str]  # whole small tensors for ``load_small``, and their variables
    small_vars: list[Variable]


IN_PLACE_MIN_BYTES = 1 << 20
"""Smaller arrays are restored into fresh ones: they are cheap to allocate, and read in bulk."""


def targets(layout: SaveLayout, prefix: str, index: Index, live: bool, reshape: bool) -> Found:
    """What to read: targets for the general loader (fresh arrays, and with ``live``
    the variables' own arrays where they can take the values), and the names and
    variables of whole small tensors for ``load_small``.

    The common case (a whole small plain tensor of the same dtype and shape) is
    recognized column-wise; everything else, errors included, goes through the
    per-variable checks.
    """
    names, variables = layout.names, layout.variables
    entries = index.entries
    rows = list(map(entries.row.get, names))
    if not variables or None in rows:
        return general_targets(prefix, index, zip(names, variables, strict=True), live, reshape)
    c = entries.columns
    rows_array = np.array(rows)
    tf_types = c.dtype[rows_array]
    same = small_plain_rows(c, rows_array)
    try:
        numpy_of = {t: dtypes.to_numpy(t) for t in set(tf_types[same].tolist())}
    except ValueError:
        return general_targets(prefix, index, zip(names, variables, strict=True), live, reshape)
    stored = [numpy_of.get(t) for t in tf_types.tolist()]
    shapes = [c.shape[r] for r in rows]
    same &= layout.whole
    same &= np.fromiter(map(operator.eq, stored, layout.dtypes), bool, len(rows))
    same &= np.fromiter(map(operator.eq, shapes, layout.shapes), bool, len(rows))
    small = np.flatnonzero(same).tolist()
    rest = [(names[i], variables[i]) for i in np.flatnonzero(~same).tolist()]
    found = general_targets(prefix, index, rest, live, reshape)
    found.small_names[:0] = [names[i] for i in small]
    found.small_vars[:0] = [variables[i] for i in small]
    return found


def general_targets(
    prefix: str, index: Index, pairs: Iterable[tuple[str, Variable]], live: bool, reshape: bool
) -> Found:
    """:func:`targets` one variable at a time, with every check and its error."""
    found = Found([], [], [], [], [])
    written: set[int] = set()  # ids of the arrays written in place
    numpy_of: dict[int, np.dtype] = {}
    for name, var in pairs:
        full = index.entries.get(name)
        if full is None:
            close = difflib.get_close_matches(name, list(index.entries), n=3, cutoff=0.5)
            hint = f"; close names in the checkpoint: {', '.join(map(repr, close))}" if close else ""
            raise NotFoundError(f"{prefix}: variable {name!r} not found in checkpoint{hint}")
        stored = numpy_of.get(full.dtype)
        if stored is None:
            stored = numpy_of[full.dtype] = stored_dtype(prefix, name, full.dtype)
        if stored != var.dtype and not (dtypes.is_string(stored) and dtypes.is_string(var.dtype)):
            raise InvalidArgumentError(
                f"{prefix}: variable {name!r} has dtype {var.dtype}, the checkpoint holds "
                f"{dtypes.tf_name(full.dtype)}"
            )
        if var.shape == full.shape and var.global_shape == full.shape and is_small_plain(full):
            found.small_names.append(name)
            found.small_vars.append(var)
            continue
        if isinstance(var, RankRow) and tuple(var.global_shape) != tuple(full.shape):
            check_shape(prefix, name, full.shape)  # saved on another number of ranks
            out = var.rows_target(prefix, name, tuple(full.shape), stored)
            found.fresh.append(Target(name, Block.whole(full.shape), out))
            found.updates.append((var, out))
            continue
        if tuple(var.global_shape) != tuple(full.shape):
            check_shape(prefix, name, full.shape)
            same_size = math.prod(var.global_shape) == math.prod(full.shape)
            if not (reshape and same_size and not var.is_sliced):
                raise InvalidArgumentError(
                    f"{prefix}: variable {name!r} has shape {list(var.global_shape)}, the "
                    f"checkpoint holds shape {list(full.shape)}"
                    + ("" if reshape else " (reshape=True allows this when sizes agree)")
                )
            out = np.empty(full.shape, dtype=stored)
            found.fresh.append(Target(name, Block.whole(full.shape), out))
            found.updates.append((var, out))
            continue
        own = own_array(var, stored) if live else None
        if own is not None and id(own) not in written:  # one variable under two names: new arrays
            written.add(id(own))
            found.live.append(Target(name, var.block, own))
            continue
        out = np.empty(var.shape, dtype=stored)
        found.fresh.append(Target(name, var.block, out))
        found.updates.append((var, out))
    return found


def small_in_place(found: Found) -> tuple[list[str], list[np.ndarray]]:
    """For a restore straight into the variables' own arrays (``"direct"``): the names of
    ``found``'s small tensors whose variables' arrays can take their bytes as they are,
    and those arrays, taken out of ``found.small_names``/``small_vars`` (an array shared by
    two variables stays there: each gets a new array)."""
    names, arrays, seen, other = [], [], set(), []
    for name, var in zip(found.small_names, found.small_vars, strict=True):
        own = own_array(var, var.dtype, min_bytes=1)
        if own is None or id(own) in seen:
            other.append((name, var))
            continue
        seen.add(id(own))
        names.append(name)
        arrays.append(own)
    found.small_names[:] = [name for name, _ in other]
    found.small_vars[:] = [var for _, var in other]
    return names, arrays


def own_array(var: Variable, dtype: np.dtype, min_bytes: int = IN_PLACE_MIN_BYTES) -> np.ndarray | None:
    """The variable's array if a restore can write into it: the right dtype and shape,
    C-contiguous, writable, and large enough (``min_bytes``; by default, for two passes
    to pay off)."""
    arr = var._value
    if (
        arr is None
        or arr.dtype != dtype
        or arr.dtype.hasobject
        or arr.shape != var.shape
        or arr.nbytes < min_bytes
        or not arr.flags.c_contiguous
        or not arr.flags.writeable
    ):
        return None
    return arr


def finish(var: Variable, arr: np.ndarray) -> np.ndarray:
    """A fresh array in its variable's shape (read in the checkpoint's, with ``reshape``;
    every row of a per-rank variable saved on another number of ranks stays as it is)."""
    if arr.shape != var.shape and not isinstance(var, RankRow):
        arr = arr.reshape(var.shape)
    return arr
