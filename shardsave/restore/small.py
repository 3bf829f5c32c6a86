"""Many small whole tensors read column-wise: the common case of a checkpoint of many variables.

The entries' fields come from the index's columns (no object per tensor), neighbouring
entries are fetched together in ranges of a few MiB, their CRCs computed in one call per
range, and the arrays are views of the fetched buffers: no per-tensor read, buffer or copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..errors import DataLossError
from ..format import crc, dtypes
from ..format.columns import PlainColumns
from ..format.entry import BundleEntry
from ..format.index import Index
from . import small_in_place
from .checks import DataFiles, check_shape, shape_ok, shard_file, stored_dtype
from .fresh import Landing
from .planner import DIRECT_MIN_BYTES
from .reads import LoadStats
from .slabs import file_array
from .verify import checksum_error

SMALL_RANGE_BYTES = 8 << 20
"""Contiguous small tensors are fetched in ranges of about this size (several in parallel)."""


def is_small_plain(entry: BundleEntry) -> bool:
    """Whether ``load_small`` reads this entry: a whole, small, non-string tensor (larger
    ones are read straight into their own arrays)."""
    return (
        entry.size < DIRECT_MIN_BYTES
        and entry.dtype != dtypes.DT_STRING
        and not entry.slices
        and not entry.block_size
    )


def small_plain_rows(columns: PlainColumns, rows: np.ndarray) -> np.ndarray:
    """``is_small_plain`` of the entries at ``rows`` of an index's columns, at once (a plain
    entry has no slices and no checksum blocks)."""
    return (
        columns.plain[rows]
        & (columns.size[rows] < DIRECT_MIN_BYTES)
        & (columns.dtype[rows] != dtypes.DT_STRING)
    )


def load_small(
    prefix: storage.Location,
    index: Index,
    names: Sequence[str],
    stats: LoadStats,
    files: DataFiles | None = None,
    into: InPlace | None = None,
) -> list[np.ndarray]:
    """New arrays holding the stored tensors ``names`` (each ``is_small_plain``), or with
    ``into`` the arrays given, filled in place (small_in_place.py).

    Column-wise, for checkpoints of many small tensors: the entries' fields come from the
    index's columns (no object per tensor), neighbouring entries are fetched together,
    their checksums verified in one pass per range, and the arrays are views of the
    fetched buffers (copies where a view would be misaligned), so no per-tensor read,
    buffer or copy is made.
    """
    entries = index.entries
    n = len(names)
    rows = np.fromiter(map(entries.row.__getitem__, names), np.int64, n)
    c = entries.columns
    fields = PlainColumns(
        np.ones(n, bool),
        c.dtype[rows],
        [c.shape[r] for r in rows.tolist()],
        c.shard_id[rows].astype(np.int64),
        c.offset[rows].astype(np.int64),
        c.size[rows].astype(np.int64),
        c.crc32c[rows],
    )
    for k in np.flatnonzero(~c.plain[rows]).tolist():  # decoded by the general decoder
        e = entries[names[k]]
        fields.dtype[k], fields.shape[k], fields.shard_id[k] = e.dtype, e.shape, e.shard_id
        fields.offset[k], fields.size[k], fields.crc32c[k] = e.offset, e.size, e.crc32c
    files = files if files is not None else DataFiles(prefix, index)
    out: list[np.ndarray | None] = [None] * n
    for shard_id in np.unique(fields.shard_id).tolist():
        which = np.flatnonzero(fields.shard_id == shard_id)
        file_loc = shard_file(prefix, index, shard_id, names[which[0]])
        _load_small_shard(
            prefix, file_loc, files.size(shard_id, names[which[0]]), fields, which, names, out, stats, into
        )
    return out


@dataclass(frozen=True, slots=True)
class InPlace:
    """Where ``load_small`` reads straight into: ``arrays[k]`` for ``names[k]``, each
    C-contiguous, writable and of the stored dtype and shape (``targets.small_in_place``
    makes sure); ``landing`` learns of each as target ``first + k``."""

    arrays: Sequence[np.ndarray]
    landing: Landing
    first: int


def _load_small_shard(
    prefix,
    file_loc,
    file_size: int,
    fields: PlainColumns,
    which: np.ndarray,
    names,
    out,
    stats,
    into: InPlace | None = None,
) -> None:
    n = len(which)
    which_list = which.tolist()
    tf_types = fields.dtype[which]
    numpy_of = {}
    for t in set(tf_types.tolist()):
        dt = dtypes.to_numpy(t) if t in dtypes.KNOWN else None
        if dt is None or dt.hasobject:  # never an array of references over file bytes
            first = names[which_list[int(np.flatnonzero(tf_types == t)[0])]]
            stored_dtype(prefix, first, t)
            raise DataLossError(f"{file_loc.url}: tensor {first!r} is a string tensor, read as plain bytes")
        numpy_of[t] = dt
    shapes = [fields.shape[k] for k in which_list]
    count_of = {}
    for shape in set(shapes):
        if not shape_ok(shape):
            check_shape(prefix, names[which_list[shapes.index(shape)]], shape)
        count_of[shape] = math.prod(shape)
    dts = [numpy_of[t] for t in tf_types.tolist()]
    itemsizes = np.fromiter((dt.itemsize for dt in dts), np.int64, n)
    starts, sizes, stored = fields.offset[which], fields.size[which], fields.crc32c[which]
    expected = np.fromiter(map(count_of.__getitem__, shapes), np.int64, n) * itemsizes
    bad = np.flatnonzero(sizes != expected)
    if len(bad):
        j = int(bad[0])
        raise DataLossError(
            f"{file_loc.url}: tensor {names[which_list[j]]!r} has {sizes[j]} bytes stored, its shape "
            f"{list(shapes[j])} of {dts[j]} needs {expected[j]}"
        )
    past = starts + sizes > file_size  # offsets and sizes are below 2**62 (parse_index)
    if past.any():
        j = int(np.flatnonzero(past)[0])
        raise DataLossError(
            f"{file_loc.url}: file too short for tensor {names[which_list[j]]!r}, stored at offset {starts[j]}, "
            f"{sizes[j]} bytes: past the end of the file ({file_size} bytes)"
        )
    stats.bytes_needed += int(sizes.sum())
    if into is not None:
        arrays = [into.arrays[k] for k in which_list]
        small_in_place.read_into(
            file_loc,
            arrays,
            starts,
            sizes,
            stored,
            [names[k] for k in which_list],
            stats,
            into.landing,
            [into.first + k for k in which_list],
        )
        for k, arr in zip(which_list, arrays, strict=True):
            out[k] = arr
        return
    # ranges of entries that touch, cut at about SMALL_RANGE_BYTES
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], starts[order] + sizes[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(n, bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    bounds = []  # (first, stop) positions in ``order`` of each range
    for a, b in zip(first.tolist(), [*first[1:].tolist(), n], strict=True):
        while a < b:
            stop = a + max(1, int(np.searchsorted(s[a:b], s[a] + SMALL_RANGE_BYTES, "left")))
            bounds.append((a, min(stop, b)))
            a = stop
    buffers = [np.empty(int(reach[b - 1] - s[a]), np.uint8) for a, b in bounds]
    stats.requests += len(bounds)
    stats.bytes_read += sum(len(buf) for buf in buffers)
    stats.files.add(file_loc.url)

    def place(k: int) -> None:
        a, b = bounds[k]
        buf, view = buffers[k], memoryview(buffers[k])
        picked = order[a:b]
        rel, ends = s[a:b] - s[a], e[a:b] - s[a]
        actual = np.array(
            crc.masked_crc32cs([view[x:y] for x, y in zip(rel.tolist(), ends.tolist(), strict=True)]),
            np.uint64,
        )
        wrong = np.flatnonzero(actual != stored[picked])
        if len(wrong):
            j = int(picked[wrong[0]])
            raise checksum_error(
                file_loc,
                names[which_list[j]],
                f"offset {starts[j]}, {sizes[j]} bytes",
                int(stored[j]),
                int(actual[wrong[0]]),
            )
        odd = (rel % itemsizes[picked] != 0) | (rel == ends)
        for j, x in zip(picked[~odd].tolist(), rel[~odd].tolist(), strict=True):
            out[which_list[j]] = np.ndarray(shapes[j], dts[j], buf, x)  # dts checked: none is object
        for j, x, y in zip(picked[odd].tolist(), rel[odd].tolist(), ends[odd].tolist(), strict=True):
            # empty, or a view would be misaligned: an array of its own
            out[which_list[j]] = file_array(view[x:y], shapes[j], dts[j]).copy()

    storage.read_ranges(
        file_loc,
        [(int(s[a]), memoryview(buf)) for (a, _), buf in zip(bounds, buffers, strict=True)],
        after=place,
    )
