"""Fills new arrays from a checkpoint, reading only the bytes they need.

The planner (planner.py) says which bytes of which data file each target needs; here the
reads are bound to buffers: reads whose spans touch share one buffer, a read that is the
whole target goes straight into it (as do whole-row regions, with the partial checksum
blocks around them in small buffers), and a large region that is not contiguous in the
file goes a slab of rows at a time (slabs.py). The ranges are fetched in parallel, every
block is verified against its stored CRC32C as soon as its range arrives, and the regions
are copied into place. From a local file, a large read straight into its target is read
and checked a chunk (CHECK_CHUNK) at a time by each I/O thread, so the check finds the
bytes still in the CPU's cache.

The same reads serve the single-pass in-place restore (direct.py): there the targets are
the variables' own arrays, and a ``Landing`` records which of them bytes reached.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import storage
from ..errors import DataLossError
from ..format import crc
from ..format.index import Index
from ..plan import Span, align_span, c_strides, coalesce
from ..save.writer import byte_view
from ..storage import threads as io_threads
from . import slabs
from .checks import DataFiles, shard_file
from .planner import plan_reads
from .reads import DirectRead, LoadStats, Read, RegionRead, RowsRead, StringRead, Target, Wanted, WholeRead
from .verify import (
    CHECK_CHUNK,
    check_entry,
    check_run,
    check_runs,
    checked_strings,
    chunk_blocks,
    chunk_crcs,
    crc_of_bytes,
)


@dataclass(slots=True)
class Bound:
    """A read bound to its target's array and to the buffer its bytes arrive in."""

    read: Read
    out: np.ndarray  # the target's array
    buffer: np.ndarray | None = None  # uint8 holding at least the span (the target, if direct)
    buffer_offset: int = 0  # where span.start sits in buffer
    strings: np.ndarray | None = None  # decoded (and verified) DT_STRING piece
    parts: list[tuple[int, memoryview]] | None = None
    """A RowsRead's (entry offset, buffer) pieces: its rows in the target, and the partial
    checksum blocks around them in small buffers."""
    pending: int = 0  # parts not read yet


class Landing:
    """Which targets bytes have reached, and which hold all of theirs, checked: what a
    failed single-pass restore into live arrays has changed (direct.py).

    A target is *touched* once a read may write into its array (a read straight into it
    has started, or checked bytes are being copied into it), and *done* once every read
    planned for it has been checked and placed."""

    def __init__(self) -> None:
        self.touched: set[int] = set()
        self._left: dict[int, int] = {}
        self._lock = threading.Lock()

    def plan(self, target: int, parts: int = 1) -> None:
        """``parts`` more reads (or slabs of one) will be placed into ``target``."""
        self._left[target] = self._left.get(target, 0) + parts

    def plan_each(self, targets: range) -> None:
        """One read will be placed into each of ``targets`` (none planned yet)."""
        self._left.update(dict.fromkeys(targets, 1))

    def touch(self, target: int) -> None:
        self.touched.add(target)  # one bytecode under the GIL: safe from any thread

    def touch_all(self, targets: list[int]) -> None:
        self.touched.update(targets)  # as touch: one call under the GIL

    def placed(self, target: int) -> None:
        with self._lock:
            self._left[target] -= 1

    def placed_whole(self, targets: list[int]) -> None:
        """Each of ``targets``, planned as one read (``plan_each``), has been placed."""
        self._left.update(dict.fromkeys(targets, 0))  # one call under the GIL

    def done(self, target: int) -> bool:
        return self._left.get(target, 0) == 0


def load(
    prefix: storage.Location,
    index: Index,
    targets: Sequence[Target],
    stats: LoadStats | None = None,
    files: DataFiles | None = None,
    landing: Landing | None = None,
) -> LoadStats:
    """Fill every target; raise DataLossError on damage, leaving partial data in ``out``
    (which ``landing``, if given, tracks). Data files are read one after the other, the
    ranges of each in parallel."""
    stats = stats if stats is not None else LoadStats()
    files = files if files is not None else DataFiles(prefix, index)
    plan = plan_reads(prefix, index, [Wanted.of(t) for t in targets], files)
    stats.bytes_needed += plan.bytes_needed
    located = [(shard_file(prefix, index, shard_id, reads[0].name), reads) for shard_id, reads in plan.shards]
    chunked = prefix.is_local
    if landing is not None:
        for _, reads in located:
            for r in reads:
                landing.plan(r.target, _placements(r, chunked))
    for file_loc, shard_reads in located:
        by_rows, in_chunks, buffered = [], [], []
        for r in shard_reads:
            b = Bound(r, targets[r.target].out)
            if _by_rows(r):
                by_rows.append(b)
            elif chunked and _in_chunks(r):
                in_chunks.append(b)
            else:
                buffered.append(b)
        ranges, groups = assign_buffers(buffered)
        stats.requests += len(ranges)
        stats.bytes_read += sum(len(buf) for _, buf in ranges)
        stats.files.add(file_loc.url)
        if landing is not None:  # these land straight in the arrays, before any check
            for b in buffered:
                if isinstance(b.read, DirectRead | RowsRead):
                    landing.touch(b.read.target)
        try:
            storage.read_ranges(file_loc, ranges, after=_after_range(file_loc, groups, landing))
            if in_chunks:
                _load_in_chunks(file_loc, in_chunks, stats, landing)
            if by_rows:
                _load_by_rows(file_loc, by_rows, stats, landing)
        except DataLossError as exc:
            names = ", ".join(sorted({repr(r.name) for r in shard_reads}))
            raise DataLossError(f"{exc} (reading tensor(s) {names})") from exc
    return stats


def _by_rows(r: Read) -> bool:
    """A large region that is not contiguous in the file, with block checksums: read a slab
    of rows at a time (slabs.py), each slab checked on its own."""
    e = r.entry
    return (
        isinstance(r, RegionRead | WholeRead)
        and bool(e.block_size and e.block_crcs)
        and bool(r.piece.shape)
        and r.span.stop - r.span.start > slabs.SLAB_BYTES
    )


def _placements(r: Read, chunked: bool) -> int:
    """How many times bytes are placed into ``r``'s target (what a ``Landing`` counts)."""
    if _by_rows(r):
        return len(slabs.row_slabs(r))
    if chunked and _in_chunks(r):
        return len(_chunk_starts(r))
    return 1


def _in_chunks(r: Read) -> bool:
    """A read straight into its target, of more than one chunk, with block checksums: read
    and checked a chunk at a time by each I/O thread (local files), so that the check reads
    bytes still in the CPU's cache. (Read whole and then checked, the bytes come back from
    memory: a GiB took 136-144 ms on one rank here that way, 107-113 ms a chunk at a time.)"""
    return (
        isinstance(r, DirectRead | RowsRead)
        and bool(r.entry.block_size and r.entry.block_crcs)
        and r.span.stop - r.span.start > CHECK_CHUNK
    )


def _chunk_starts(r: Read) -> range:
    return range(r.span.start, r.span.stop, _chunk_step(r))


def _chunk_step(r: Read) -> int:
    return chunk_blocks(r.entry.block_size) * r.entry.block_size


def _landing_parts(b: Bound) -> list[tuple[int, memoryview]]:
    """(entry offset, buffer) pieces covering ``b``'s span, in order: the target itself, and
    for a RowsRead the partial checksum blocks around its rows in small buffers."""
    r = b.read
    if isinstance(r, DirectRead):
        return [(0, byte_view(b.out))]
    parts = [(r.start, byte_view(b.out)[r.dest : r.dest + r.stop - r.start])]
    if r.span.start < r.start:
        parts.insert(0, (r.span.start, memoryview(np.empty(r.start - r.span.start, np.uint8))))
    if r.stop < r.span.stop:
        parts.append((r.stop, memoryview(np.empty(r.span.stop - r.stop, np.uint8))))
    return parts


def _load_in_chunks(
    file_loc: storage.Location, bounds: list[Bound], stats: LoadStats, landing: Landing | None
) -> None:
    fd = storage.open_local(file_loc)  # once: not an open per chunk
    try:
        jobs = []
        expected = chunk_crcs([(b.read.entry, b.read.span) for b in bounds])
        for b, wants in zip(bounds, expected, strict=True):
            r = b.read
            b.parts = _landing_parts(b)
            step = _chunk_step(r)
            stats.bytes_read += r.span.stop - r.span.start
            jobs += [
                partial(_load_chunk, file_loc, fd, b, start, min(start + step, r.span.stop), want, landing)
                for start, want in zip(_chunk_starts(r), wants, strict=True)
            ]
        stats.requests += len(jobs)
        io_threads.run_on_workers(jobs)
    finally:
        storage.close_local(fd)


def _load_chunk(
    file_loc: storage.Location,
    fd: int,
    b: Bound,
    start: int,
    stop: int,
    expected: int,
    landing: Landing | None,
    _scratch: memoryview,
) -> None:
    """Read entry bytes ``[start, stop)`` of ``b`` (whole checksum blocks) into place, check them."""
    r = b.read
    if landing is not None:
        landing.touch(r.target)
    pieces = _parts_within(b, start, stop)
    storage.read_local_run(file_loc, fd, r.entry.offset + start, pieces)
    actual = 0
    for piece in pieces:
        actual = crc.crc32c(piece, actual)
    if actual != expected:  # raises, naming the block that differs
        check_run(file_loc, r, start, stop, expected, partial(_parts_crc, b))
    if landing is not None:
        landing.placed(r.target)


def _load_by_rows(
    file_loc: storage.Location, bounds: list[Bound], stats: LoadStats, landing: Landing | None
) -> None:
    jobs, largest = [], 0
    for b in bounds:
        r = b.read
        for first, count in slabs.row_slabs(r):
            span = align_span(Span(*slabs.rows_span(r, first, count)), r.entry.block_size, r.entry.size)
            largest = max(largest, span.stop - span.start)
            stats.bytes_read += span.stop - span.start
            jobs.append(partial(_load_rows, file_loc, b, first, count, span, landing))
    stats.requests += len(jobs)
    io_threads.run_on_workers(jobs, largest)


def _load_rows(
    file_loc: storage.Location,
    b: Bound,
    first: int,
    count: int,
    span: Span,
    landing: Landing | None,
    scratch: memoryview,
) -> None:
    """Read the checksum blocks holding a slab's rows, check them, and copy out the region."""
    r = b.read
    data = scratch[: span.stop - span.start]
    storage.read_ranges(file_loc, [(r.entry.offset + span.start, data)])
    check_runs(file_loc, r, span, crc_of_bytes(data, span.start))
    start, stop = slabs.rows_span(r, first, count)
    if landing is not None:
        landing.touch(r.target)
    slabs.scatter_rows(r, b.out, first, count, data[start - span.start : stop - span.start])
    if landing is not None:
        landing.placed(r.target)


def assign_buffers(bounds: list[Bound]) -> tuple[list[tuple[int, memoryview]], list[list[Bound]]]:
    """Give every read a buffer; reads whose spans touch share one buffer.

    Returns the ranges to fetch and, for each range, the reads it serves.
    """
    ranges: list[tuple[int, memoryview]] = []
    groups: list[list[Bound]] = []
    shared = []
    for b in bounds:
        r = b.read
        if isinstance(r, DirectRead):
            b.buffer = b.out
            ranges.append((r.entry.offset, byte_view(b.out)))
            groups.append([b])
        elif isinstance(r, RowsRead):
            b.parts = _landing_parts(b)
            b.pending = len(b.parts)
            for offset, buf in b.parts:
                ranges.append((r.entry.offset + offset, buf))
                groups.append([b])
        else:
            shared.append(b)
    spans = [
        (b.read.entry.offset + b.read.span.start, b.read.entry.offset + b.read.span.stop) for b in shared
    ]
    merged = coalesce(spans)
    buffers = [(start, np.empty(stop - start, np.uint8)) for start, stop in merged]
    starts = [start for start, _ in merged]
    first_group = len(groups)
    groups += [[] for _ in merged]
    for b, (start, _) in zip(shared, spans, strict=True):
        i = bisect.bisect_right(starts, start) - 1
        b.buffer = buffers[i][1]
        b.buffer_offset = start - buffers[i][0]
        groups[first_group + i].append(b)
    ranges += [(start, memoryview(buf)) for start, buf in buffers]
    return ranges, groups


def _span_bytes(b: Bound) -> memoryview:
    if isinstance(b.read, DirectRead):
        return byte_view(b.buffer)
    span = b.read.span
    return memoryview(b.buffer)[b.buffer_offset : b.buffer_offset + span.stop - span.start]


def _verify(file_loc: storage.Location, bounds: list[Bound]) -> None:
    for b in bounds:
        r = b.read
        data = _span_bytes(b)
        e = r.entry
        if isinstance(r, StringRead):
            b.strings = checked_strings(file_loc, bytes(data), r)
        elif e.block_size and e.block_crcs:
            check_runs(file_loc, r, r.span, crc_of_bytes(data, r.span.start))
        else:
            check_entry(file_loc, r, crc.crc32c(data))


def _after_range(file_loc: storage.Location, groups: list[list[Bound]], landing: Landing | None = None):
    """What to do when range ``i`` has been read: verify and place its reads; a RowsRead
    is verified once the last of its parts has arrived (they arrive in any order)."""
    lock = threading.Lock()

    def after(i: int) -> None:
        group = groups[i]
        if group[0].parts is None:
            _verify(file_loc, group)
            for b in group:
                if landing is not None:
                    landing.touch(b.read.target)
                scatter(b)
                if landing is not None:
                    landing.placed(b.read.target)
            return
        b = group[0]
        with lock:
            b.pending -= 1
            done = not b.pending
        if done:
            check_runs(file_loc, b.read, b.read.span, partial(_parts_crc, b))
            if landing is not None:
                landing.placed(b.read.target)

    return after


def _parts_within(b: Bound, start: int, stop: int) -> list[memoryview]:
    """The pieces of ``b.parts`` that hold entry bytes ``[start, stop)``, in order."""
    out = []
    for offset, buf in b.parts:
        lo, hi = max(offset, start), min(offset + len(buf), stop)
        if lo < hi:
            out.append(buf[lo - offset : hi - offset])
    return out


def _parts_crc(b: Bound, start: int, stop: int) -> int:
    """The CRC32C of entry bytes ``[start, stop)`` of a read landing in parts, from its parts."""
    actual = 0
    for piece in _parts_within(b, start, stop):
        actual = crc.crc32c(piece, actual)
    return actual


def scatter(b: Bound) -> None:
    r = b.read
    if isinstance(r, DirectRead):
        return
    if isinstance(r, WholeRead):
        byte_view(b.out)[:] = _span_bytes(b)
        return
    dest = slabs.region_destination(r)
    if isinstance(r, StringRead):  # decoded by the string decoder, which checked them
        b.out[dest] = b.strings[
            tuple(slice(o, o + n) for o, n in zip(r.region.offset, r.region.shape, strict=True))
        ]
        return
    data = _span_bytes(b)
    dtype = b.out.dtype
    itemsize = dtype.itemsize
    strides = tuple(s * itemsize for s in c_strides(r.piece.shape))
    first = sum(o * s for o, s in zip(r.region.offset, strides, strict=True))
    b.out[dest] = slabs.file_array(data, r.region.shape, dtype, offset=first - r.span.start, strides=strides)
