"""Regions that are not contiguous in the file, read a slab of whole stored rows at a time.

A reshard by columns (or across inner dimensions) needs only part of each stored row.
Reading from a region's first stored byte to its last into one buffer needs as much
memory as the stored piece; reading a few MiB of whole rows at a time and copying out the
part the target holds bounds it to one slab per thread. Rows are the first dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataLossError

if TYPE_CHECKING:
    from .reads import RegionRead, RowsRead, StringRead, WholeRead

    Placed = RegionRead | RowsRead | StringRead | WholeRead

SLAB_BYTES = 4 << 20
"""Stored rows read at a time (or one row, if a row is larger)."""


def row_slabs(r: Placed) -> list[tuple[int, int]]:
    """``(first, count)`` for each slab of ``r``'s region: its rows ``[first, first + count)``
    (region-relative), as many whole stored rows as fit in SLAB_BYTES."""
    per = max(1, SLAB_BYTES // _row_bytes(r))
    rows = r.region.shape[0]
    return [(first, min(per, rows - first)) for first in range(0, rows, per)]


def rows_span(r: Placed, first: int, count: int) -> tuple[int, int]:
    """Entry-relative ``[start, stop)`` of the whole stored rows of a slab."""
    row = _row_bytes(r)
    start = (r.region.offset[0] + first) * row
    return start, start + count * row


def scatter_rows(r: Placed, out: np.ndarray, first: int, count: int, rows: memoryview) -> None:
    """Copy rows ``[first, first + count)`` of ``r``'s region into ``out`` (its target's
    array) from ``rows``, which holds those whole rows as stored."""
    src = file_array(rows, (count, *r.piece.shape[1:]), out.dtype)
    inner = tuple(slice(o, o + n) for o, n in zip(r.region.offset[1:], r.region.shape[1:], strict=True))
    dest = region_destination(r)
    at = dest[0].start + first
    out[(slice(at, at + count), *dest[1:])] = src[(slice(None), *inner)]


def file_array(
    buffer, shape: tuple[int, ...], dtype: np.dtype, offset: int = 0, strides: tuple[int, ...] | None = None
) -> np.ndarray:
    """An array over bytes read from a data file. Never of dtype object: its elements would
    be whatever pointers the file's bytes spell (strings go through format/strings.py)."""
    if dtype.hasobject:
        raise DataLossError(f"an array of {dtype} cannot be made over stored bytes")
    return np.ndarray(shape, dtype, buffer, offset, strides)


def _row_bytes(r: Placed) -> int:
    return r.entry.size // r.piece.shape[0]


def region_destination(r: Placed) -> tuple[slice, ...]:
    """Where ``r``'s region lands in its target."""
    return tuple(slice(a, a + n) for a, n in zip(r.at, r.region.shape, strict=True))
