"""Fills destination arrays from a checkpoint, reading only the bytes they need.

For every destination block the loader intersects it with the stored pieces of its
tensor (plan.py), turns each intersection into a byte span of a data file widened to
whole checksum blocks, merges spans that touch, fetches them in parallel, verifies every
block against its stored CRC32C and copies the regions into place. A span that is a
whole large entry and the whole destination is read straight into the destination.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from . import slabs, storage
from .errors import DataLossError, NotFoundError
from .format import crc, dtypes
from .format.coding import DecodeError
from .format.columns import PlainColumns
from .format.entry import BundleEntry
from .format.index import Index
from .format.names import data_file_name
from .format.strings import decode_strings
from .plan import Block, Span, align_span, c_strides, coalesce, region_span
from .save.writer import byte_view
from .storage import threads as io_threads

DIRECT_MIN_BYTES = 1 << 20


@dataclass(slots=True)
class Target:
    """Fill ``out`` (shape ``block.shape``) with region ``block`` of stored tensor ``name``."""

    name: str
    block: Block
    out: np.ndarray


@dataclass
class LoadStats:
    bytes_read: int = 0
    bytes_reread: int = 0
    """Read a second time, into variables' own arrays once checked (in_place.py)."""
    requests: int = 0
    bytes_needed: int = 0
    files: set = field(default_factory=set)


@dataclass(slots=True)
class Read:
    """One intersection of a target with a stored piece, and where its bytes come from."""

    target: Target
    entry: BundleEntry
    name: str
    piece: Block
    region: Block  # relative to the piece
    span: Span  # entry-relative, aligned to checksum blocks
    buffer: np.ndarray | None = None  # uint8 holding at least the span
    buffer_offset: int = 0  # where span.start sits in buffer
    direct: bool = False
    whole: bool = False  # the whole stored entry is the whole target
    strings: np.ndarray | None = None  # decoded (and verified) DT_STRING piece
    body: tuple[int, int, memoryview] | None = None
    """Read in place: entry bytes ``[start, stop)`` land straight in this part of the
    target; the rest of the span (partial checksum blocks) in ``parts``' small buffers."""
    parts: list[tuple[int, memoryview]] | None = None  # (entry offset, buffer) of an in-place read
    pending: int = 0  # parts of an in-place read not read yet


def stored_pieces(index: Index, name: str) -> tuple[BundleEntry, list[tuple[Block, BundleEntry]]]:
    """The full entry of ``name`` and its pieces (one whole piece for a plain tensor), as
    stored: nothing checked (``checked_pieces`` checks them)."""
    full = index.entries[name]
    if name in index.pieces:
        pieces = [(Block.from_extents(ext, full.shape), e) for ext, e in index.pieces[name].items()]
    else:
        pieces = [(Block.whole(full.shape), full)]
    return full, pieces


MAX_BLOCK_SIZE = 16 << 20
"""The largest checksum block a reader accepts (shardsave writes 64 KiB): each read
thread holds one block at a time, so a crafted size must not make that a GiB."""


class DataFiles:
    """The sizes of a checkpoint's data files, each looked up once (a stat; a HEAD request
    on an object store), so that every entry can be checked to lie inside its file before
    anything is allocated or read."""

    def __init__(self, prefix: storage.Location, index: Index):
        self.prefix = prefix
        self.index = index
        self._sizes: dict[int, int] = {}

    def size(self, shard_id: int, name: str) -> int:
        found = self._sizes.get(shard_id)
        if found is None:
            loc = shard_file(self.prefix, self.index, shard_id, name)
            found = storage.size(loc)
            if found is None:
                raise NotFoundError(f"reading {loc.url}: not found (the data file of tensor {name!r})")
            self._sizes[shard_id] = found
        return found

    def holds(self, entry: BundleEntry) -> bool:
        """Whether the entry's bytes lie inside its data file, if its size is known already."""
        size = self._sizes.get(entry.shard_id)
        return size is not None and entry.offset + entry.size <= size

    def check(self, name: str, entry: BundleEntry) -> None:
        """The entry's bytes lie inside its data file."""
        if entry.offset + entry.size > self.size(entry.shard_id, name):
            loc = shard_file(self.prefix, self.index, entry.shard_id, name)
            raise DataLossError(
                f"{loc.url}: file too short for tensor {name!r}, stored at offset {entry.offset}, "
                f"{entry.size} bytes: past the end of the file ({self.size(entry.shard_id, name)} bytes)"
            )


def stored_dtype(prefix: storage.Location | str, name: str, tf_type: int) -> np.dtype:
    """The numpy dtype of a tensor's DataType; DataLossError if shardsave knows no such type."""
    try:
        return dtypes.to_numpy(tf_type)
    except ValueError:
        raise DataLossError(f"{_url(prefix)}.index: tensor {name!r} has dtype {tf_type}, "
                            "which is no DataType shardsave can read") from None


def shape_ok(shape: tuple[int, ...]) -> bool:
    """Whether numpy can make an array of this shape (the index may say anything)."""
    return len(shape) <= MAX_RANK and all(d >= 0 for d in shape) and math.prod(d for d in shape if d) <= MAX_ELEMENTS


def check_shape(prefix: storage.Location | str, name: str, shape: tuple[int, ...]) -> None:
    """DataLossError unless ``shape_ok``."""
    if not shape_ok(shape):
        raise DataLossError(f"{_url(prefix)}.index: tensor {name!r} has shape {list(shape)}, which no array "
                            f"can have (at most {MAX_RANK} dimensions, none negative, {MAX_ELEMENTS} elements)")


def _url(prefix: storage.Location | str) -> str:
    return prefix if isinstance(prefix, str) else prefix.url


MAX_RANK = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
"""numpy's limit on dimensions (TF's is 254)."""
MAX_ELEMENTS = 1 << 59
"""More elements than this (the non-zero dimensions' product) no array can hold: numpy
needs ``elements x itemsize`` (up to 16 bytes) to fit in 63 bits."""


def checked_pieces(prefix: storage.Location, index: Index, name: str,
                   files: DataFiles) -> tuple[BundleEntry, list[tuple[Block, BundleEntry]]]:
    """``stored_pieces``, every piece checked against its tensor before a byte is read:
    a known dtype, the tensor's dtype and rank, an extent inside its shape, as many bytes
    as its elements need (and checksum blocks that fit them), inside its data file.

    After this, reading and placing the pieces can fail only on the bytes read (checksums,
    I/O): the second pass of an in-place restore cannot meet anything it did not check."""
    full = index.entries[name]
    dtype = stored_dtype(prefix, name, full.dtype)
    check_shape(prefix, name, full.shape)
    if name not in index.pieces:
        check_stored_entry(prefix, name, full, Block.whole(full.shape), dtype, files)
        return full, [(Block.whole(full.shape), full)]
    pieces = []
    shape, rank, itemsize = full.shape, len(full.shape), dtype.itemsize
    plain = full.dtype != dtypes.DT_STRING
    for extents, entry in index.pieces[name].items():  # a million pieces may be checked: the common case inline
        piece = Block(tuple([start for start, _ in extents]), entry.shape)
        if not (entry.dtype == full.dtype and len(extents) == rank and _fits(extents, entry.shape, shape)):
            _explain_piece(prefix, name, full, extents, entry)
        if not (plain and entry.size == math.prod(entry.shape) * itemsize and not entry.block_size
                and not entry.block_crcs and files.holds(entry)):
            check_stored_entry(prefix, name, entry, piece, dtype, files)
        pieces.append((piece, entry))
    _check_disjoint(prefix, name, [piece for piece, _ in pieces])
    _check_covered(prefix, name, full, pieces, index.pieces[name])
    return full, pieces


def _check_covered(prefix: storage.Location, name: str, full: BundleEntry,
                   pieces: list[tuple[Block, BundleEntry]], keys) -> None:
    """The (disjoint) pieces tile the whole tensor, and their keys are exactly the slices
    its full entry lists (TensorFlow finds a tensor's pieces through that list): as every
    writer stores them. Else a read would return elements no piece holds."""
    where = f"{prefix.url}.index: tensor {name!r}"
    covered, total = sum(math.prod(piece.shape) for piece, _ in pieces), math.prod(full.shape)
    if covered != total:
        raise DataLossError(f"{where}: field slices: its pieces hold {covered} of its {total} elements")
    try:
        listed = {tuple(map(tuple, extents)) for extents in full.slices}
    except (DecodeError, ValueError, IndexError, OverflowError) as exc:
        raise DataLossError(f"{where}: field slices do not decode: {exc}") from None
    if listed != {tuple(map(tuple, extents)) for extents in keys}:
        raise DataLossError(f"{where}: field slices: the slices its entry lists are not the pieces the index holds")


def _fits(extents, piece_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Extents ``(start, length)`` (length -1: the whole dimension) inside ``shape``, and
    ``piece_shape`` is their lengths."""
    if not len(extents) == len(piece_shape) == len(shape):
        return False
    return all(n >= 0 and start >= 0 and start + n <= d and (length == n or (length == -1 and start == 0 and n == d))
               for (start, length), n, d in zip(extents, piece_shape, shape, strict=True))


def _check_disjoint(prefix: storage.Location, name: str, pieces: list[Block]) -> None:
    """No two pieces share an element (else a region is stored twice and another not at
    all, and the covered count of a restore would not see it).

    Pieces are sorted along the dimension where their starts differ most, and only those
    that overlap in it are compared: no pair at all for pieces cut along one dimension,
    a row of a grid for pieces cut along two."""
    pieces = [p for p in pieces if p.size]
    if len(pieces) < 2 or not pieces[0].shape:
        return
    lo = np.array([p.offset for p in pieces], np.int64)
    hi = lo + np.array([p.shape for p in pieces], np.int64)
    dim = max(range(lo.shape[1]), key=lambda d: len(np.unique(lo[:, d])))
    order = np.argsort(lo[:, dim], kind="stable")
    lo, hi = lo[order], hi[order]
    stop = np.searchsorted(lo[:, dim], hi[:, dim], "left")  # j < stop[i]: j starts before i ends
    counts = np.maximum(stop - np.arange(len(lo)) - 1, 0)
    if not counts.any():
        return
    first = np.repeat(np.arange(len(lo)), counts)
    second = first + 1 + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    overlap = ((lo[first] < hi[second]) & (lo[second] < hi[first])).all(axis=1)
    if overlap.any():
        k = int(np.flatnonzero(overlap)[0])
        a, b = (pieces[int(order[i])] for i in (first[k], second[k]))
        raise DataLossError(f"{prefix.url}.index: pieces {list(a.extents())} and {list(b.extents())} "
                            f"of tensor {name!r} overlap")


def _explain_piece(prefix: storage.Location, name: str, full: BundleEntry, extents, entry: BundleEntry) -> None:
    """Raise the DataLossError that says why a piece does not fit its tensor."""
    where = f"{prefix.url}.index: piece {list(extents)} of tensor {name!r}"
    if entry.dtype != full.dtype:
        raise DataLossError(f"{where} has dtype {dtypes.tf_name(entry.dtype)}, its tensor {dtypes.tf_name(full.dtype)}")
    if len(extents) != len(full.shape):
        raise DataLossError(f"{where} has rank {len(extents)}, its tensor's shape is {list(full.shape)}")
    for (start, length), dim in zip(extents, full.shape, strict=True):
        if not (length == -1 and start == 0) and not (start >= 0 and length >= 0 and start + length <= dim):
            raise DataLossError(f"{where} does not lie inside the tensor's shape {list(full.shape)}")
    piece = Block.from_extents(extents, full.shape)
    raise DataLossError(f"{where} has shape {list(entry.shape)}, its extents say {list(piece.shape)}")


def check_stored_entry(prefix: storage.Location, name: str, entry: BundleEntry, piece: Block, dtype: np.dtype,
                files: DataFiles) -> None:
    """The entry holding ``piece`` of tensor ``name`` has the bytes its elements need,
    checksum blocks that fit them, and lies inside its data file."""
    _check_entry_size(prefix, name, entry, piece, dtype)
    _check_block_crcs(prefix, name, entry)
    files.check(name, entry)


def load(prefix: storage.Location, index: Index, targets: Sequence[Target],
         stats: LoadStats | None = None, files: DataFiles | None = None) -> LoadStats:
    """Fill every target; raise DataLossError on damage, leaving partial data in ``out``."""
    stats = stats if stats is not None else LoadStats()
    for file_loc, shard_reads in planned_reads(prefix, index, targets, stats, files):
        by_rows, buffered = [], []
        for r in shard_reads:
            (by_rows if _by_rows(r) else buffered).append(r)
        ranges, groups = assign_buffers(buffered)
        stats.requests += len(ranges)
        stats.bytes_read += sum(len(buf) for _, buf in ranges)
        stats.files.add(file_loc.url)
        try:
            storage.read_ranges(file_loc, ranges, after=_after_range(file_loc, groups))
            if by_rows:
                _load_by_rows(file_loc, by_rows, stats)
        except DataLossError as exc:
            names = ", ".join(sorted({repr(r.name) for r in shard_reads}))
            raise DataLossError(f"{exc} (reading tensor(s) {names})") from exc
    return stats


def _by_rows(r: Read) -> bool:
    """A large region that is not contiguous in the file, with block checksums: read a slab
    of rows at a time (slabs.py), each slab checked on its own."""
    e = r.entry
    return (not r.direct and r.body is None and e.dtype != dtypes.DT_STRING and bool(e.block_size and e.block_crcs)
            and bool(r.piece.shape) and r.span.stop - r.span.start > slabs.SLAB_BYTES)


def _load_by_rows(file_loc: storage.Location, reads: list[Read], stats: LoadStats) -> None:
    jobs, largest = [], 0
    for r in reads:
        for first, count in slabs.row_slabs(r):
            span = align_span(Span(*slabs.rows_span(r, first, count)), r.entry.block_size, r.entry.size)
            largest = max(largest, span.stop - span.start)
            stats.bytes_read += span.stop - span.start
            jobs.append(partial(_load_rows, file_loc, r, first, count, span))
    stats.requests += len(jobs)
    io_threads.run_on_workers(jobs, largest)


def _load_rows(file_loc: storage.Location, r: Read, first: int, count: int, span: Span, scratch: memoryview) -> None:
    """Read the checksum blocks holding a slab's rows, check them, and copy out the region."""
    data = scratch[: span.stop - span.start]
    storage.read_ranges(file_loc, [(r.entry.offset + span.start, data)])
    _check_runs(file_loc, r, span, crc_of_bytes(data, span.start))
    start, stop = slabs.rows_span(r, first, count)
    slabs.scatter_rows(r, first, count, data[start - span.start : stop - span.start])


def planned_reads(prefix: storage.Location, index: Index, targets: Sequence[Target], stats: LoadStats,
                  files: DataFiles | None = None) -> list[tuple[storage.Location, list[Read]]]:
    """The reads that fill ``targets``, grouped by data file (in shard order), every entry
    they touch checked against its tensor and its data file (``checked_pieces``)."""
    files = files if files is not None else DataFiles(prefix, index)
    with index_damage(prefix):  # slice entries are decoded only now (index.Pieces)
        reads = _plan(prefix, index, targets, stats, files)
    by_shard: dict[int, list[Read]] = defaultdict(list)
    for r in reads:
        by_shard[r.entry.shard_id].append(r)
    return [(shard_file(prefix, index, shard_id, shard_reads[0].name), shard_reads)
            for shard_id, shard_reads in sorted(by_shard.items())]


@contextlib.contextmanager
def index_damage(prefix: storage.Location) -> Iterator[None]:
    """Turn a DecodeError (of slice entries, decoded on first use) into a DataLossError."""
    try:
        yield
    except DecodeError as exc:
        raise DataLossError(f"{prefix.url}.index is damaged: {exc}") from exc


def shard_file(prefix: storage.Location, index: Index, shard_id: int, name: str) -> storage.Location:
    """The data file of ``shard_id``, which tensor ``name``'s entry points at."""
    num_shards = index.header.num_shards
    if shard_id >= num_shards:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} is in shard {shard_id}, "
            f"but the checkpoint has {num_shards} shard(s)"
        )
    return prefix.with_path(data_file_name(prefix.path, shard_id, num_shards))


CHECK_RUN_BLOCKS = 16
"""Checksum blocks (64 KiB as saved) checked with one CRC call (see crc.run_crcs)."""

SMALL_RANGE_BYTES = 8 << 20
"""Contiguous small tensors are fetched in ranges of about this size (several in parallel)."""


def is_small_plain(entry: BundleEntry) -> bool:
    """Whether ``load_small`` reads this entry: a whole, small, non-string tensor (larger
    ones are read straight into their own arrays)."""
    return (entry.size < DIRECT_MIN_BYTES and entry.dtype != dtypes.DT_STRING and not entry.slices
            and not entry.block_size)


def small_plain_rows(columns: PlainColumns, rows: np.ndarray) -> np.ndarray:
    """``is_small_plain`` of the entries at ``rows`` of an index's columns, at once (a plain
    entry has no slices and no checksum blocks)."""
    return columns.plain[rows] & (columns.size[rows] < DIRECT_MIN_BYTES) & (columns.dtype[rows] != dtypes.DT_STRING)


def load_small(prefix: storage.Location, index: Index, names: Sequence[str], stats: LoadStats,
               files: DataFiles | None = None) -> list[np.ndarray]:
    """New arrays holding the stored tensors ``names`` (each ``is_small_plain``).

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
    fields = PlainColumns(np.ones(n, bool), c.dtype[rows], [c.shape[r] for r in rows.tolist()],
                          c.shard_id[rows].astype(np.int64), c.offset[rows].astype(np.int64),
                          c.size[rows].astype(np.int64), c.crc32c[rows])
    for k in np.flatnonzero(~c.plain[rows]).tolist():  # decoded by the general decoder
        e = entries[names[k]]
        fields.dtype[k], fields.shape[k], fields.shard_id[k] = e.dtype, e.shape, e.shard_id
        fields.offset[k], fields.size[k], fields.crc32c[k] = e.offset, e.size, e.crc32c
    files = files if files is not None else DataFiles(prefix, index)
    out: list[np.ndarray | None] = [None] * n
    for shard_id in np.unique(fields.shard_id).tolist():
        which = np.flatnonzero(fields.shard_id == shard_id)
        file_loc = shard_file(prefix, index, shard_id, names[which[0]])
        _load_small_shard(prefix, file_loc, files.size(shard_id, names[which[0]]), fields, which, names, out, stats)
    return out


def _load_small_shard(prefix, file_loc, file_size: int, fields: PlainColumns, which: np.ndarray, names, out,
                      stats) -> None:
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
        actual = np.array(crc.masked_crc32cs([view[x:y] for x, y in zip(rel.tolist(), ends.tolist(), strict=True)]),
                          np.uint64)
        wrong = np.flatnonzero(actual != stored[picked])
        if len(wrong):
            j = int(picked[wrong[0]])
            raise checksum_error(file_loc, names[which_list[j]], f"offset {starts[j]}, {sizes[j]} bytes",
                                  int(stored[j]), int(actual[wrong[0]]))
        odd = (rel % itemsizes[picked] != 0) | (rel == ends)
        for j, x in zip(picked[~odd].tolist(), rel[~odd].tolist(), strict=True):
            out[which_list[j]] = np.ndarray(shapes[j], dts[j], buf, x)  # dts checked: none is object
        for j, x, y in zip(picked[odd].tolist(), rel[odd].tolist(), ends[odd].tolist(), strict=True):
            # empty, or a view would be misaligned: an array of its own
            out[which_list[j]] = slabs.file_array(view[x:y], shapes[j], dts[j]).copy()

    storage.read_ranges(file_loc, [(int(s[a]), memoryview(buf)) for (a, _), buf in zip(bounds, buffers, strict=True)],
                        after=place)


def _plan(prefix: storage.Location, index: Index, targets: Sequence[Target], stats: LoadStats,
          files: DataFiles) -> list[Read]:
    reads: list[Read] = []
    checked: dict[str, tuple[BundleEntry, list[tuple[Block, BundleEntry]]]] = {}
    for t in targets:
        full = index.entries.get(t.name)
        if full is None:
            raise NotFoundError(f"{prefix.url}: tensor {t.name!r} not found in checkpoint")
        if t.block.shape == full.shape and full.dtype != dtypes.DT_STRING and t.name not in index.pieces:
            # fast path: a whole plain tensor (most of the variables of most checkpoints)
            size = t.out.nbytes
            if full.size != size:
                _check_entry_size(prefix, t.name, full, t.block, t.out.dtype)
            _check_block_crcs(prefix, t.name, full)
            files.check(t.name, full)
            stats.bytes_needed += size
            reads.append(Read(t, full, t.name, t.block, t.block, Span(0, size),
                               direct=size >= DIRECT_MIN_BYTES, whole=True))
            continue
        if t.name not in checked:
            checked[t.name] = checked_pieces(prefix, index, t.name, files)
        full, pieces = checked[t.name]
        dtype = dtypes.to_numpy(full.dtype)
        stats.bytes_needed += t.block.size * (dtype.itemsize if full.dtype != dtypes.DT_STRING else 0)
        covered = 0
        for piece, entry in pieces:
            inter = piece.intersect(t.block) if t.block.size else None
            if inter is None:
                continue
            covered += inter.size
            region = Block(
                tuple(a - b for a, b in zip(inter.offset, piece.offset, strict=True)), inter.shape
            )
            if full.dtype == dtypes.DT_STRING or not entry.block_size:
                span = Span(0, entry.size)
            else:
                span = align_span(region_span(piece.shape, region, dtype.itemsize),
                                  entry.block_size, entry.size)
            direct = (
                full.dtype != dtypes.DT_STRING
                and entry.size >= DIRECT_MIN_BYTES
                and inter == t.block
                and region.shape == piece.shape
                and t.out.flags.c_contiguous
            )
            body = None if direct else _in_place_body(t, piece, region, inter, entry, dtype.itemsize)
            if body is not None:
                span = align_span(Span(body[0], body[1]), entry.block_size, entry.size)
            reads.append(Read(t, entry, t.name, piece, region, span, direct=direct, body=body))
        if covered != t.block.size:
            raise DataLossError(
                f"{prefix.url}: the stored pieces of {t.name!r} cover {covered} of the "
                f"{t.block.size} elements of the requested region at offset "
                f"{list(t.block.offset)} with shape {list(t.block.shape)}"
            )
    return reads


def _in_place_body(t: Target, piece: Block, region: Block, inter: Block, entry: BundleEntry,
                   itemsize: int) -> tuple[int, int, memoryview] | None:
    """Where a large region can be read straight into the target (resharding by rows):
    it must be contiguous in the stored piece (whole trailing dimensions) and in the
    target, and the entry must have per-block checksums so that the bytes around it can
    be verified without reading the whole entry. None otherwise."""
    if entry.dtype == dtypes.DT_STRING or not entry.block_size or not piece.shape or not t.out.flags.c_contiguous:
        return None
    if region.shape[1:] != piece.shape[1:] or tuple(t.block.shape[1:]) != region.shape[1:]:
        return None
    if any(a != b for a, b in zip(inter.offset[1:], t.block.offset[1:], strict=True)):
        return None
    row = math.prod(region.shape[1:]) * itemsize
    nbytes = region.shape[0] * row
    if nbytes < DIRECT_MIN_BYTES:
        return None
    start = region.offset[0] * row
    dest = (inter.offset[0] - t.block.offset[0]) * row
    return start, start + nbytes, byte_view(t.out)[dest : dest + nbytes]


def _check_entry_size(prefix, name: str, entry: BundleEntry, piece: Block, dtype: np.dtype) -> None:
    if entry.dtype == dtypes.DT_STRING:  # a varint length of at least a byte per element, and a CRC
        if piece.size and entry.size < piece.size + 4:
            raise DataLossError(
                f"{prefix.url}.index: string tensor {name!r} has {entry.size} bytes stored, too few "
                f"for the {piece.size} elements of its shape {list(piece.shape)} (at least {piece.size + 4})"
            )
        return
    expected = piece.size * dtype.itemsize
    if entry.size != expected:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} has {entry.size} bytes stored, its shape "
            f"{list(piece.shape)} of {dtype} needs {expected}"
        )


def _check_block_crcs(prefix, name: str, entry: BundleEntry) -> None:
    if not (entry.block_size or entry.block_crcs):
        return
    if not 0 < entry.block_size <= MAX_BLOCK_SIZE:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} has a crc32c_block_size of {entry.block_size} bytes, "
            f"outside 1..{MAX_BLOCK_SIZE}"
        )
    want = 4 * -(-entry.size // entry.block_size)
    if len(entry.block_crcs) != want:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} has {len(entry.block_crcs)} bytes of block checksums, "
            f"{want} expected for {entry.size} bytes in blocks of {entry.block_size}"
        )


def assign_buffers(reads: list[Read]) -> tuple[list[tuple[int, memoryview]], list[list[Read]]]:
    """Give every read a buffer; reads whose spans touch share one buffer.

    Returns the ranges to fetch and, for each range, the reads it serves.
    """
    ranges: list[tuple[int, memoryview]] = []
    groups: list[list[Read]] = []
    shared = []
    for r in reads:
        if r.direct:
            r.buffer = r.target.out
            ranges.append((r.entry.offset, byte_view(r.target.out)))
            groups.append([r])
        elif r.body is not None:
            start, stop, dest = r.body
            r.parts = [(start, dest)]
            if r.span.start < start:
                r.parts.insert(0, (r.span.start, memoryview(np.empty(start - r.span.start, np.uint8))))
            if stop < r.span.stop:
                r.parts.append((stop, memoryview(np.empty(r.span.stop - stop, np.uint8))))
            r.pending = len(r.parts)
            for offset, buf in r.parts:
                ranges.append((r.entry.offset + offset, buf))
                groups.append([r])
        else:
            shared.append(r)
    spans = [(r.entry.offset + r.span.start, r.entry.offset + r.span.stop) for r in shared]
    merged = coalesce(spans)
    buffers = [(start, np.empty(stop - start, np.uint8)) for start, stop in merged]
    starts = [start for start, _ in merged]
    first_group = len(groups)
    groups += [[] for _ in merged]
    for r, (start, _) in zip(shared, spans, strict=True):
        i = bisect.bisect_right(starts, start) - 1
        r.buffer = buffers[i][1]
        r.buffer_offset = start - buffers[i][0]
        groups[first_group + i].append(r)
    ranges += [(start, memoryview(buf)) for start, buf in buffers]
    return ranges, groups


def _span_bytes(r: Read) -> memoryview:
    if r.direct:
        return byte_view(r.buffer)
    return memoryview(r.buffer)[r.buffer_offset : r.buffer_offset + r.span.stop - r.span.start]


def _verify(file_loc: storage.Location, reads: list[Read]) -> None:
    def check(r: Read) -> None:
        data = _span_bytes(r)
        e = r.entry
        if r.entry.dtype == dtypes.DT_STRING:
            r.strings = _decode_strings(file_loc, bytes(data), r)
            return
        if e.block_size and e.block_crcs:
            _check_runs(file_loc, r, r.span, crc_of_bytes(data, r.span.start))
        else:
            check_entry(file_loc, r, crc.crc32c(data))

    for r in reads:
        check(r)


def _check_runs(file_loc: storage.Location, r: Read, span: Span, crc_of: Callable[[int, int], int]) -> None:
    """Check entry bytes ``span`` (aligned to checksum blocks) a run of blocks at a time."""
    step = CHECK_RUN_BLOCKS * r.entry.block_size
    runs = range(span.start, span.stop, step)
    for start, want in zip(runs, span_run_crcs(r.entry, span, CHECK_RUN_BLOCKS), strict=True):
        check_run(file_loc, r, start, min(start + step, span.stop), want, crc_of)


def crc_of_bytes(data: memoryview, start: int) -> Callable[[int, int], int]:
    """``crc_of`` for ``check_run`` over ``data``, which holds entry bytes from ``start``."""
    return lambda lo, hi: crc.crc32c(data[lo - start : hi - start])


def _after_range(file_loc: storage.Location, groups: list[list[Read]]):
    """What to do when range ``i`` has been read: verify and place its reads; an in-place
    read is verified once the last of its parts has arrived (they arrive in any order)."""
    lock = threading.Lock()

    def after(i: int) -> None:
        group = groups[i]
        if group[0].parts is None:
            _verify_and_place(file_loc, group)
            return
        r = group[0]
        with lock:
            r.pending -= 1
            done = not r.pending
        if done:
            _verify_in_place(file_loc, r)

    return after


def _verify_in_place(file_loc: storage.Location, r: Read) -> None:
    """Check an in-place read across the buffers holding it."""
    _check_runs(file_loc, r, r.span, partial(_parts_crc, r))


def _parts_crc(r: Read, start: int, stop: int) -> int:
    """The CRC32C of entry bytes ``[start, stop)`` of an in-place read, from its parts."""
    actual = 0
    for offset, buf in r.parts:
        lo, hi = max(offset, start), min(offset + len(buf), stop)
        if lo < hi:
            actual = crc.crc32c(buf[lo - offset : hi - offset], actual)
    return actual


def span_run_crcs(e: BundleEntry, span: Span, run_blocks: int) -> list[int]:
    """The CRC32C of each run of ``run_blocks`` checksum blocks of entry bytes ``span``
    (aligned to blocks), from the stored block CRCs (lengths checked by the plan)."""
    bs = e.block_size
    first = span.start // bs
    count = -(-(span.stop - span.start) // bs)
    return crc.run_crcs(e.block_crcs[4 * first : 4 * (first + count)], bs, span.stop - span.start, run_blocks)


def check_run(file_loc: storage.Location, r: Read, start: int, stop: int, expected: int,
              crc_of: Callable[[int, int], int]) -> None:
    """Check entry bytes ``[start, stop)`` (whole checksum blocks) against ``expected``, the
    CRC their blocks' stored CRCs combine to; ``crc_of(lo, hi)`` is the CRC32C of entry
    bytes ``[lo, hi)`` as read. On a mismatch, name the block that differs."""
    actual = crc_of(start, stop)
    if actual == expected:
        return
    e = r.entry
    for block in range(start, stop, e.block_size):
        check_block(file_loc, r.name, e, block, crc.mask(crc_of(block, min(block + e.block_size, stop))))
    at = e.offset + start  # no block differs alone: the stored CRCs are inconsistent
    raise checksum_error(file_loc, r.name, f"bytes {at}..{e.offset + stop}", crc.mask(expected), crc.mask(actual))


def check_entry(file_loc: storage.Location, r: Read, actual: int) -> None:
    """Compare ``actual``, the (unmasked) CRC32C of all of ``r``'s entry, with its stored CRC."""
    e = r.entry
    if crc.mask(actual) != e.crc32c:
        raise checksum_error(file_loc, r.name, f"offset {e.offset}, {e.size} bytes", e.crc32c, crc.mask(actual))


def check_block(file_loc: storage.Location, name: str, entry: BundleEntry, start: int, actual: int) -> None:
    """Compare the masked CRC of the checksum block at entry offset ``start`` with the stored one."""
    i = start // entry.block_size
    stored = int.from_bytes(entry.block_crcs[4 * i : 4 * i + 4], "little")
    if stored != actual:
        raise checksum_error(file_loc, name, f"bytes {entry.offset + start}..", stored, actual)


def checksum_error(file_loc: storage.Location, name: str, where: str, stored: int, actual: int) -> DataLossError:
    return DataLossError(
        f"{file_loc.url}: checksum does not match for tensor {name!r} ({where}): "
        f"stored {stored:#010x} vs. calculated {actual:#010x}"
    )


def _verify_and_place(file_loc: storage.Location, reads: list[Read]) -> None:
    """Check the bytes of one fetched range, then copy them into their targets (the
    targets are fresh arrays, so a later failure still leaves every variable as it was)."""
    _verify(file_loc, reads)
    for r in reads:
        scatter(r)


def scatter(r: Read) -> None:
    if r.whole:
        if not r.direct:
            byte_view(r.target.out)[:] = _span_bytes(r)
        return
    if r.direct:
        return
    t = r.target
    dest = slabs.region_destination(r)
    data = _span_bytes(r)
    if r.strings is not None:  # decoded by the string decoder, which checked them
        src = r.strings[tuple(slice(o, o + n) for o, n in zip(r.region.offset, r.region.shape, strict=True))]
        t.out[dest] = src
        return
    dtype = t.out.dtype
    itemsize = dtype.itemsize
    strides = tuple(s * itemsize for s in c_strides(r.piece.shape))
    first = sum(o * s for o, s in zip(r.region.offset, strides, strict=True))
    src = slabs.file_array(data, r.region.shape, dtype, offset=first - r.span.start, strides=strides)
    t.out[dest] = src


def _decode_strings(file_loc: storage.Location, data: bytes, r: Read) -> np.ndarray:
    where = f"{file_loc.url}: string tensor {r.name!r} (offset {r.entry.offset}, {r.entry.size} bytes)"
    try:
        values, actual = decode_strings(data, r.piece.shape)
    except ValueError as exc:
        raise DataLossError(f"{where} is damaged: {exc}") from exc
    if actual != r.entry.crc32c:
        raise DataLossError(
            f"{where}: checksum does not match: stored {r.entry.crc32c:#010x} vs. calculated {actual:#010x}"
        )
    return values
