"""Variables and the default graph that ``Saver()`` saves when given no list.

A :class:`Variable` is a named numpy array, or this rank's block of a larger variable
(``global_shape`` and ``offset``). A :class:`PartitionedVariable` is TF's partitioned
variable: the parts of one variable, spread over the ranks of a communicator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import leaves
from .errors import FailedPreconditionError, InvalidArgumentError
from .initializers import Initializer
from .partitioners import Partitioner, partition_blocks
from .plan import Block


def _as_shape(shape: Any) -> tuple[int, ...]:
    if shape is None:
        return ()
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(int(d) for d in shape)


class Variable:
    """A named array; the unit that a Saver saves and restores.

    A ``value`` that is a writable, C-contiguous numpy array (not of dtype object, and
    ``dtype`` not asking for another) is used itself, not copied: a save reads it as it is
    then (``w += 3`` before ``save`` is saved), :meth:`assign` and a restore write into it
    (``np.copyto``), so ``var.value is w``. So is a CPU torch tensor: the variable holds a
    numpy view of the tensor's memory. ``copy=True``, or a value that is not writable,
    not C-contiguous, a list, a scalar or any other dtype, gives the variable its own copy,
    which ``assign`` and a restore replace.
    """

    def __init__(
        self,
        name: str,
        value: Any = None,
        *,
        dtype: Any = None,
        shape: Sequence[int] | None = None,
        global_shape: Sequence[int] | None = None,
        offset: Sequence[int] | None = None,
        initializer: Initializer | None = None,
        trainable: bool = True,
        graph: Graph | None = None,
        register: bool = True,
        copy: bool = False,
    ):
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"variable name must be a non-empty string, got {name!r}")
        self.name = name
        self.trainable = trainable
        self._value: np.ndarray | None = None
        self._shared = False
        """Whether ``_value`` is the caller's memory: written into, never replaced."""
        if value is not None:
            view = None if isinstance(value, Variable) else leaves.numpy_view(value, f"variable {name!r}")
            if view is not None and not copy and leaves.shareable(view, dtype):
                arr, self._shared = view, True
            else:
                source = view if view is not None else value
                arr = np.array(source, dtype=dtype) if dtype is not None else np.array(source)
            if arr.dtype.kind in "SU":
                arr = arr.astype(object)
            self.dtype = arr.dtype
            self.shape = arr.shape
            if shape is not None and _as_shape(shape) != arr.shape:
                raise InvalidArgumentError(
                    f"variable {name!r}: value has shape {list(arr.shape)}, shape= says {list(_as_shape(shape))}"
                )
            self._value = arr
        else:
            self.dtype = np.dtype(dtype if dtype is not None else np.float32)
            self.shape = _as_shape(shape)
        self.global_shape = _as_shape(global_shape) if global_shape is not None else self.shape
        self.offset = _as_shape(offset) if offset is not None else (0,) * len(self.global_shape)
        self._check_block()
        if self._value is None and initializer is not None:
            self._value = self._initial_value(initializer)
        if register:
            (graph or get_default_graph()).add(self)

    @classmethod
    def _sharing(cls, name: str, view: np.ndarray) -> Variable:
        """An unregistered variable over ``view`` itself, whatever its strides (a tree's
        leaf: a copy would go stale as the caller updates it in place)."""
        var = cls(name, dtype=view.dtype, shape=view.shape, register=False)
        var._value, var._shared = view, True
        return var

    @property
    def shares_memory(self) -> bool:
        """True when the variable holds the caller's array (or tensor memory) itself."""
        return self._shared

    def _check_block(self) -> None:
        g, o, s = self.global_shape, self.offset, self.shape
        if (
            len(g) != len(s)
            or len(o) != len(s)
            or any(oi < 0 or oi + si > gi for oi, si, gi in zip(o, s, g, strict=True))
        ):
            raise InvalidArgumentError(
                f"variable {self.name!r}: block of shape {list(s)} at offset {list(o)} does not "
                f"fit in global shape {list(g)}"
            )

    def _initial_value(self, initializer: Initializer) -> np.ndarray:
        if self.is_sliced:
            whole = np.asarray(initializer(self.global_shape, dtype=self.dtype))
            return np.array(whole[self.block_slices], dtype=self.dtype)
        return np.array(initializer(self.shape, dtype=self.dtype), dtype=self.dtype)

    @property
    def block(self) -> Block:
        return Block(self.offset, self.shape)

    @property
    def block_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape, strict=True))

    @property
    def is_sliced(self) -> bool:
        return not self.block.is_whole(self.global_shape)

    @property
    def initialized(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> np.ndarray:
        if self._value is None:
            raise FailedPreconditionError(
                f"variable {self.name!r} is not initialized: give it an initializer or a value, "
                "or restore it from a checkpoint"
            )
        return self._value

    def numpy(self) -> np.ndarray:
        return self.value

    def assign(self, value: Any) -> Variable:
        """Give the variable ``value`` (same shape; cast to the dtype): written into the
        caller's array when the variable shares one (``np.copyto``), else a new copy."""
        if self._shared and self._value is not None:
            src = leaves.numpy_view(value, f"variable {self.name!r}")
            src = np.asarray(value) if src is None else src
            if src.shape != self.shape:
                raise InvalidArgumentError(
                    f"variable {self.name!r}: cannot assign shape {list(src.shape)} to shape {list(self.shape)}"
                )
            if not self._value.flags.writeable:
                raise FailedPreconditionError(
                    f"variable {self.name!r} shares an array that is no longer writable; cannot assign"
                )
            np.copyto(self._value, src, casting="unsafe")
            return self
        arr = np.array(value, dtype=self.dtype)
        if arr.shape != self.shape:
            raise InvalidArgumentError(
                f"variable {self.name!r}: cannot assign shape {list(arr.shape)} to shape {list(self.shape)}"
            )
        self._value = arr
        return self

    def _check_set(self, arr: np.ndarray) -> None:
        """Raise unless :meth:`_set` can take ``arr``: a restore calls it for every variable
        before it writes into any, so that it stays all or nothing."""
        own = self._value if self._shared else None
        if own is not None and (
            arr.shape != self.shape or own.shape != self.shape or not own.flags.writeable
        ):
            raise FailedPreconditionError(
                f"variable {self.name!r} shares an array that is no longer writable or of shape "
                f"{list(self.shape)} (it is {list(own.shape)}); cannot restore into it"
            )

    def _set(self, arr: np.ndarray) -> None:
        """Take a restored array: copied into the caller's array when the variable shares
        one, else adopted without copying (restore hands over fresh arrays)."""
        if not self._shared or self._value is None:
            self._value = arr
        elif arr is not self._value:
            np.copyto(self._value, arr)

    def __array__(self, dtype=None, copy=None):
        arr = self.value
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        where = (
            ""
            if not self.is_sliced
            else f" offset={list(self.offset)} global_shape={list(self.global_shape)}"
        )
        return f"<shardsave.Variable {self.name!r} shape={list(self.shape)} dtype={self.dtype}{where}>"


class PartitionedVariable:
    """The parts of one variable split by a partitioner; this rank holds ``parts``."""

    def __init__(
        self,
        name: str,
        global_shape: tuple[int, ...],
        dtype: np.dtype,
        parts: list[Variable],
        partitions: list[int],
    ):
        self.name = name
        self.global_shape = global_shape
        self.shape = global_shape
        self.dtype = dtype
        self.parts = parts
        self.partitions = partitions

    def __iter__(self) -> Iterator[Variable]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def initialized(self) -> bool:
        return all(p.initialized for p in self.parts)

    @property
    def value(self) -> np.ndarray:
        """The whole variable; only when this process holds every part."""
        if sum(p.block.size for p in self.parts) != math.prod(self.global_shape):
            raise FailedPreconditionError(
                f"partitioned variable {self.name!r}: this rank holds only some parts; read .parts"
            )
        out = np.empty(self.global_shape, dtype=self.dtype)
        for p in self.parts:
            out[p.block_slices] = p.value
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self.value
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        return (
            f"<shardsave.PartitionedVariable {self.name!r} shape={list(self.global_shape)} "
            f"partitions={self.partitions} local_parts={len(self.parts)}>"
        )


class Graph:
    """A collection of variables with unique names."""

    def __init__(self) -> None:
        self._vars: dict[str, Variable | PartitionedVariable] = {}

    def add(self, var: Variable | PartitionedVariable) -> None:
        if var.name in self._vars:
            raise InvalidArgumentError(
                f"variable {var.name!r} already exists in this graph; use another name or "
                "reset_default_graph()"
            )
        self._vars[var.name] = var

    def get(self, name: str) -> Variable | PartitionedVariable | None:
        return self._vars.get(name)

    def variables(self) -> list[Variable | PartitionedVariable]:
        return list(self._vars.values())

    @contextlib.contextmanager
    def as_default(self) -> Iterator[Graph]:
        global _default_graph
        saved, _default_graph = _default_graph, self
        try:
            yield self
        finally:
            _default_graph = saved


_default_graph = Graph()


def get_default_graph() -> Graph:
    return _default_graph


def reset_default_graph() -> None:
    """Forget every variable of the default graph (they keep working, unregistered)."""
    global _default_graph
    _default_graph = Graph()


def global_variables() -> list[Variable | PartitionedVariable]:
    return get_default_graph().variables()


def trainable_variables() -> list[Variable | PartitionedVariable]:
    return [v for v in global_variables() if getattr(v, "trainable", True)]


def get_variable(
    name: str,
    shape: Sequence[int] | None = None,
    dtype: Any = np.float32,
    initializer: Initializer | Any = None,
    *,
    partitioner: Partitioner | None = None,
    comm: Any = None,
    trainable: bool = True,
) -> Variable | PartitionedVariable:
    """Create a variable in the default graph, as ``tf.compat.v1.get_variable`` does.

    With no initializer the variable stays uninitialized until assigned or restored.
    With a ``partitioner`` the result is a :class:`PartitionedVariable`; under a
    communicator of size n, rank r holds parts r, r + n, ...; with no ``comm`` this process
    holds every part.
    """
    dtype = np.dtype(dtype)
    if initializer is not None and not callable(initializer):
        value = np.asarray(initializer, dtype=dtype)
        initializer_fn = lambda s, dtype=None, **_: value  # noqa: E731
        if shape is None:
            shape = value.shape
    else:
        initializer_fn = initializer
    if shape is None:
        raise InvalidArgumentError(f"get_variable({name!r}): shape is required")
    shape = _as_shape(shape)
    if partitioner is None:
        return Variable(name, dtype=dtype, shape=shape, initializer=initializer_fn, trainable=trainable)
    partitions = list(partitioner(shape, dtype=dtype))
    blocks = partition_blocks(shape, partitions)
    rank, size = _rank_and_size(comm)
    whole = None
    if initializer_fn is not None:
        whole = np.asarray(initializer_fn(shape, dtype=dtype), dtype=dtype)
    parts = []
    for i, block in enumerate(blocks):
        if i % size != rank:
            continue
        value = (
            None
            if whole is None
            else whole[tuple(slice(o, o + s) for o, s in zip(block.offset, block.shape, strict=True))]
        )
        parts.append(
            Variable(
                name,
                value=value,
                dtype=dtype,
                shape=block.shape,
                global_shape=shape,
                offset=block.offset,
                trainable=trainable,
                register=False,
            )
        )
    pv = PartitionedVariable(name, shape, dtype, parts, partitions)
    get_default_graph().add(pv)
    return pv


def _rank_and_size(comm: Any) -> tuple[int, int]:
    if comm is None:
        return 0, 1
    return comm.Get_rank(), comm.Get_size()
