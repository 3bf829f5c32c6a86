"""``shardsave diff A B``: which tensors differ between two checkpoints.

Names, shapes and dtypes from the two indexes alone; with ``values``, the tensors present
in both with the same shape and dtype are read one at a time (through the reader, so every
byte is checked against its CRC) and compared: numbers by their largest absolute
difference (NaN equals NaN, -0.0 equals 0.0), strings for equality.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .format import dtypes
from .reader import CheckpointReader


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
            found = value_difference(a.get_tensor(name), b.get_tensor(name))
            if found is not None:
                yield f"values differ: {name}  {found}"


def value_difference(x: np.ndarray, y: np.ndarray) -> str | None:
    """None if equal, else how they differ: elements that differ and the largest absolute
    difference (``inf`` or ``nan`` where one side is)."""
    if x.dtype.kind == "O":
        differ = np.fromiter(
            (p != q for p, q in zip(x.reshape(-1), y.reshape(-1), strict=True)), bool, x.size
        )
        count = int(differ.sum())
        return f"{count} of {x.size} string(s) differ" if count else None
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
    shown = str(biggest) if isinstance(biggest, int) else f"{biggest:g}"
    return f"max abs difference {shown} ({count} of {x.size} element(s) differ)"
