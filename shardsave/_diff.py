"""``shardsave diff A B``: which tensors differ between two checkpoints.

Names, shapes and dtypes from the two indexes alone; with ``values``, the tensors present
in both with the same shape and dtype are read one at a time (through the reader, so every
byte is checked against its CRC) and compared: numbers by their largest absolute
difference (NaN equals NaN, -0.0 equals 0.0), strings for equality. A tensor larger than
CHUNK_BYTES is compared a slab of rows at a time where its entries have per-block CRCs (a
slab then reads only its own blocks); one with a single CRC per entry (as TensorFlow
writes them) is read whole, since any part of it needs all of its bytes checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .format import dtypes
from .format.coding import DecodeError
from .reader import CheckpointReader

CHUNK_BYTES = 32 << 20
"""The most bytes of one tensor, per checkpoint, held at once when it can be read in slabs."""


def _kind(reader: CheckpointReader, name: str) -> tuple[str, list[int]]:
    entry = reader.get_entries().entries[name]
    return dtypes.tf_name(entry.dtype), list(entry.shape)


def differences(a: CheckpointReader, b: CheckpointReader, values: bool = False) -> Iterator[str]:
    """One line per difference, in name order."""
    names_a, names_b = set(a.get_entries().entries), set(b.get_entries().entries)
    for name in sorted(names_a | names_b):
        if name not in names_b:
            dtype, shape = _kind(a, name)
            yield f"only in A: {name}  {dtype}  {shape}"
            continue
        if name not in names_a:
            dtype, shape = _kind(b, name)
            yield f"only in B: {name}  {dtype}  {shape}"
            continue
        (dtype_a, shape_a), (dtype_b, shape_b) = _kind(a, name), _kind(b, name)
        if dtype_a != dtype_b:
            yield f"dtype differs: {name}  {dtype_a} vs. {dtype_b}"
        if shape_a != shape_b:
            yield f"shape differs: {name}  {shape_a} vs. {shape_b}"
        if values and dtype_a == dtype_b and shape_a == shape_b:
            found = _tensor_difference(a, b, name, shape_a)
            if found is not None:
                yield f"values differ: {name}  {found}"


def _slabs(reader: CheckpointReader, name: str, shape: list[int]) -> list[slice] | None:
    """Row slabs of at most CHUNK_BYTES to read ``name`` by, or None to read it whole."""
    index = reader.get_entries()
    full = index.entries[name]
    if full.dtype == dtypes.DT_STRING or not shape or full.dtype not in dtypes.KNOWN:
        return None
    row = math.prod(shape[1:]) * dtypes.to_numpy(full.dtype).itemsize
    if row * shape[0] <= CHUNK_BYTES:
        return None
    try:
        entries = list(index.pieces[name].values()) if name in index.pieces else [full]
    except DecodeError:
        return None  # the whole read says what is wrong
    if any(e.size > CHUNK_BYTES and not e.block_crcs for e in entries):
        return None
    rows = max(1, CHUNK_BYTES // max(row, 1))
    return [slice(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]


def _tensor_difference(a: CheckpointReader, b: CheckpointReader, name: str, shape: list[int]) -> str | None:
    slabs_a, slabs_b = _slabs(a, name, shape), _slabs(b, name, shape)
    if slabs_a is None or slabs_b is None:
        return value_difference(a.get_tensor(name), b.get_tensor(name))
    count, biggest, size = 0, 0, math.prod(shape)
    for rows in slabs_a:
        found = _count_and_max(a.get_slice(name, rows), b.get_slice(name, rows))
        if found is not None:
            count += found[0]
            biggest = found[1] if math.isnan(found[1]) or math.isnan(biggest) else max(biggest, found[1])
    return _describe(count, biggest, size)


def value_difference(x: np.ndarray, y: np.ndarray) -> str | None:
    """None if equal, else how they differ: elements that differ and the largest absolute
    difference (``inf`` or ``nan`` where one side is)."""
    if x.dtype.kind == "O":
        differ = np.fromiter(
            (p != q for p, q in zip(x.reshape(-1), y.reshape(-1), strict=True)), bool, x.size
        )
        count = int(differ.sum())
        return f"{count} of {x.size} string(s) differ" if count else None
    found = _count_and_max(x, y)
    return None if found is None else _describe(*found, x.size)


def _describe(count: int, biggest: float | int, size: int) -> str | None:
    if not count:
        return None
    shown = str(biggest) if isinstance(biggest, int) else f"{biggest:g}"
    return f"max abs difference {shown} ({count} of {size} element(s) differ)"


def _count_and_max(x: np.ndarray, y: np.ndarray) -> tuple[int, float | int] | None:
    """``(elements that differ, the largest absolute difference)``, None if equal."""
    if x.dtype.kind not in "biufc":  # bfloat16, float8 (ml_dtypes): compare as float64
        x, y = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        differ = x != y
        if x.dtype.kind in "fc":
            differ &= ~(np.isnan(x) & np.isnan(y))
        count = int(differ.sum())
        if not count:
            return None
        xs, ys = x[differ], y[differ]
        if xs.dtype.kind == "b":
            biggest = 1
        elif xs.dtype.kind in "iu":  # exact, without overflow (64-bit ones as Python ints)
            wide = np.int64 if xs.dtype.itemsize < 8 else object
            biggest = int(np.abs(xs.astype(wide) - ys.astype(wide)).max())
        else:
            diff = np.abs(xs.astype(np.complex128 if xs.dtype.kind == "c" else np.float64) - ys)
            biggest = float("nan") if np.isnan(diff).any() else float(diff.max())
    return count, biggest
