"""Reading checkpoints in one process: CheckpointReader, list_variables, load_variable."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import storage
from ._comm import Comm
from .checkpoint_state import resolve_checkpoint
from .errors import InvalidArgumentError, NotFoundError
from .format import dtypes
from .plan import Block
from .restore.checks import DataFiles, check_shape, checked_pieces, index_damage, stored_dtype
from .restore.fresh import load
from .restore.index import read_index
from .restore.reads import Target


class CheckpointReader:
    """Reads the tensors of one checkpoint (TF's ``NewCheckpointReader``).

    ``bytes_read`` counts the data-file bytes fetched so far, so callers can check that a
    partial read fetched no more than it needed.
    """

    def __init__(self, prefix: str | os.PathLike, *, storage_options: dict | None = None, fs: Any = None):
        self.prefix = resolve_checkpoint(prefix, storage_options=storage_options, fs=fs)
        self._loc = storage.resolve(self.prefix, storage_options, fs)
        # recover: a save interrupted after its commit point is finished first (save/commit.py)
        self._index = read_index(self._loc, Comm(None), f"reading {self.prefix}", recover=True)
        self.bytes_read = 0

    @property
    def num_shards(self) -> int:
        return self._index.header.num_shards

    def _full(self, name: str):
        entry = self._index.entries.get(name)
        if entry is None:
            import difflib

            close = difflib.get_close_matches(name, list(self._index.entries), n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(map(repr, close))}" if close else ""
            raise NotFoundError(f"{self.prefix}: tensor {name!r} not found in checkpoint{hint}")
        return entry

    def has_tensor(self, name: str) -> bool:
        return name in self._index.entries

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        return {name: list(e.shape) for name, e in self._index.entries.items()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        return {name: stored_dtype(self._loc, name, e.dtype) for name, e in self._index.entries.items()}

    def get_tensor(self, name: str) -> np.ndarray:
        """The whole tensor, reassembled from its pieces if it was saved sliced."""
        entry = self._full(name)
        return self._read(name, Block.whole(entry.shape))

    def get_slice(self, name: str, index: Any) -> np.ndarray:
        """``tensor[index]`` for basic numpy indices (ints and step-1 slices), reading
        only the bytes that region needs."""
        entry = self._full(name)
        check_shape(self._loc, name, entry.shape)
        block, squeeze = _block_of(entry.shape, index, name)
        out = self._read(name, block)
        return out.reshape([n for n, sq in zip(out.shape, squeeze, strict=True) if not sq])

    def _read(self, name: str, block: Block) -> np.ndarray:
        self._full(name)
        files = DataFiles(self._loc, self._index)
        with index_damage(self._loc):  # shape, dtype and pieces checked before allocating
            full, _ = checked_pieces(self._loc, self._index, name, files)
        out = np.empty(block.shape, dtype=dtypes.to_numpy(full.dtype))
        stats = load(self._loc, self._index, [Target(name, block, out)], files=files)
        self.bytes_read += stats.bytes_read
        return out

    def debug_string(self) -> bytes:
        lines = [
            f"{name} ({dtypes.tf_enum_name(e.dtype)}) {list(e.shape)}"
            for name, e in sorted(self._index.entries.items())
        ]
        return ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")

    def get_entries(self):
        """The parsed index (header, entries and slice pieces), for tools."""
        return self._index


def _block_of(shape: tuple[int, ...], index: Any, name: str) -> tuple[Block, list[bool]]:
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        pos = next(k for k, i in enumerate(index) if i is Ellipsis)
        fill = (slice(None),) * (len(shape) - len(index) + 1)
        index = index[:pos] + fill + index[pos + 1 :]
    if len(index) > len(shape):
        raise InvalidArgumentError(f"tensor {name!r} of shape {list(shape)}: too many indices {index!r}")
    index = index + (slice(None),) * (len(shape) - len(index))
    offset, size, squeeze = [], [], []
    for dim, (i, n) in enumerate(zip(index, shape, strict=True)):
        if isinstance(i, int | np.integer):
            j = int(i) + n if i < 0 else int(i)
            if not 0 <= j < n:
                raise InvalidArgumentError(
                    f"tensor {name!r}: index {i} out of range for dimension {dim} of size {n}"
                )
            offset.append(j)
            size.append(1)
            squeeze.append(True)
        elif isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                raise InvalidArgumentError(f"tensor {name!r}: only step-1 slices are supported, got {i!r}")
            offset.append(start)
            size.append(max(0, stop - start))
            squeeze.append(False)
        else:
            raise InvalidArgumentError(f"tensor {name!r}: unsupported index {i!r}")
    return Block(tuple(offset), tuple(size)), squeeze


def list_variables(
    ckpt: str | os.PathLike, *, storage_options: dict | None = None, fs: Any = None
) -> list[tuple[str, list[int]]]:
    """Sorted ``(name, shape)`` of every tensor in a checkpoint (prefix or directory)."""
    reader = CheckpointReader(ckpt, storage_options=storage_options, fs=fs)
    return sorted(reader.get_variable_to_shape_map().items())


def load_variable(
    ckpt: str | os.PathLike, name: str, *, storage_options: dict | None = None, fs: Any = None
) -> np.ndarray:
    """One tensor of a checkpoint (prefix or directory), reassembled whole."""
    if name.endswith(":0"):
        name = name[:-2]
    return CheckpointReader(ckpt, storage_options=storage_options, fs=fs).get_tensor(name)
