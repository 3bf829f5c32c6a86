"""Restore into the variables' own arrays without ever leaving one half-written.

A restore into fresh arrays needs the memory twice and pays for faulting the new pages
in; reading straight into the arrays the variables already hold needs neither, but a
checksum or read error found halfway would leave them half-restored. So this reads in
two passes:

1. ``check``: every byte that will land in a variable's array is read into a 1 MiB
   scratch buffer and compared with its CRC32C, by one thread per CPU (up to
   ``io_threads.MAX_WORKERS``). Nothing is written yet.
2. ``fill``: once every rank has checked (the Saver agrees in between), the same bytes
   are read again, normally from the page cache: straight into the arrays where a region
   is contiguous in the file, else a slab of whole stored rows at a time (a reshard by
   columns), so neither pass needs memory in proportion to the data.

The data files stay open from the first pass to the second, so the second reads the
files that were checked even if a path is replaced meanwhile; a file written to in place
meanwhile changes its modification time, which the second pass compares. Local files
only: on an object store the second pass would download everything again. (Mapping the
files instead of reading them saves the first pass's copy: 0.15 -> 0.10 s per GiB here. But a
file truncated under the mapping, or an I/O error on a network filesystem, kills the
process with SIGBUS instead of raising an error, and the mapped pages count in the
process's RSS unless released window by window.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .. import storage
from ..errors import DataLossError
from ..format import crc
from ..format.index import Index
from ..save.writer import byte_view
from ..storage import threads as io_threads
from . import slabs
from .checks import DataFiles, shard_file
from .planner import plan_reads
from .reads import DirectRead, LoadStats, Read, RowsRead, Target, Wanted
from .verify import CHECK_CHUNK, check_entry, check_run, chunk_blocks, chunk_crcs, crc_of_bytes


class InPlaceLoad:
    """Two-pass reads into live arrays; a context manager that closes the files."""

    def __init__(self, prefix: storage.Location, index: Index):
        self.prefix = prefix
        self.index = index
        self.files = DataFiles(prefix, index)
        """The data files' sizes, which every planned read is checked against (shared with
        the restore's other loads, so that each file is looked up once)."""
        self._files: list[_File] = []
        self._slab_bytes = 0
        self._slab_scratch: list[memoryview] = []

    def __enter__(self) -> InPlaceLoad:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        files, self._files = self._files, []
        for f in files:
            with contextlib.suppress(OSError):
                storage.close_local(f.fd)

    def check(self, targets: Sequence[Target], stats: LoadStats) -> None:
        """Pass 1: open the data files, verify every byte ``targets`` will receive, and
        allocate what the second pass needs (so nothing after the check can fail but a read)."""
        jobs: list[Callable[[memoryview], None]] = []
        scratch_bytes = CHECK_CHUNK
        plan = plan_reads(self.prefix, self.index, [Wanted.of(t) for t in targets], self.files)
        stats.bytes_needed += plan.bytes_needed
        located = [
            (shard_file(self.prefix, self.index, shard_id, reads[0].name), reads)
            for shard_id, reads in plan.shards
        ]
        for file_loc, reads in located:
            fd = storage.open_local(file_loc)
            f = _File(file_loc, fd, os.fstat(fd))
            self._files.append(f)
            stats.files.add(file_loc.url)
            blocked = [r for r in reads if r.entry.block_size and r.entry.block_crcs]
            expected_of = dict(
                zip(map(id, blocked), chunk_crcs([(r.entry, r.span) for r in blocked]), strict=True)
            )
            for r in reads:
                e, span = r.entry, r.span
                stats.bytes_read += span.stop - span.start
                if e.block_size and e.block_crcs:
                    step = chunk_blocks(e.block_size) * e.block_size
                    scratch_bytes = max(scratch_bytes, step)
                    expected = expected_of[id(r)]
                    jobs += [
                        partial(_check_blocks, file_loc, fd, r, start, min(start + step, span.stop), want)
                        for start, want in zip(range(span.start, span.stop, step), expected, strict=True)
                    ]
                else:  # one CRC over the whole entry (as TF writes them), computed in order
                    jobs.append(partial(_check_entry, file_loc, fd, r))
            # the second pass reads a region that is contiguous in the file straight into its
            # array; any other (reshards by columns, or across several dimensions) through a
            # slab of whole stored rows at a time, never a buffer as large as the stored bytes
            for r in reads:
                out = targets[r.target].out
                if isinstance(r, DirectRead):
                    f.ranges.append((r.entry.offset, byte_view(out)))
                elif isinstance(r, RowsRead):
                    f.ranges.append(
                        (r.entry.offset + r.start, byte_view(out)[r.dest : r.dest + r.stop - r.start])
                    )
                else:
                    f.slabs += [(r, out, first, count) for first, count in slabs.row_slabs(r)]
            for r, _, first, count in f.slabs:
                start, stop = slabs.rows_span(r, first, count)
                self._slab_bytes = max(self._slab_bytes, stop - start)
        if jobs:
            stats.requests += len(jobs)
            io_threads.run_on_workers(jobs, scratch_bytes)
        if any(f.slabs for f in self._files):  # allocated now: after the check only reads can fail
            self._slab_scratch = [
                memoryview(np.empty(self._slab_bytes, np.uint8)) for _ in range(io_threads.workers())
            ]

    def fill(self, stats: LoadStats) -> None:
        """Pass 2: read the checked bytes into the targets, from the files opened by ``check``,
        and make sure no file was written to in between (a write updates its mtime)."""
        for f in self._files:
            stats.bytes_reread += sum(len(buf) for _, buf in f.ranges)
            storage.read_ranges(f.loc, f.ranges, fd=f.fd)
            if f.slabs:
                stats.bytes_reread += sum(
                    stop - start
                    for start, stop in (slabs.rows_span(r, first, count) for r, _, first, count in f.slabs)
                )
                io_threads.run_on_workers(
                    [partial(_fill_slab, f, *job) for job in f.slabs], scratch=self._slab_scratch
                )
            now = os.fstat(f.fd)
            if _identity(now) != _identity(f.stat):
                raise DataLossError(
                    f"{f.loc.url} changed while it was being restored (size {f.stat.st_size} -> "
                    f"{now.st_size}, modified {f.stat.st_mtime_ns} -> {now.st_mtime_ns} ns)"
                )


@dataclass(slots=True)
class _File:
    """A data file held open from the check to the fill, and what to read from it."""

    loc: storage.Location
    fd: int
    stat: os.stat_result
    ranges: list[tuple[int, memoryview]] = field(default_factory=list)  # straight into arrays
    slabs: list[tuple[Read, np.ndarray, int, int]] = field(default_factory=list)
    """(read, its target's array, first row, rows) of each slab read through a scratch buffer."""


def _fill_slab(f: _File, r: Read, out: np.ndarray, first: int, count: int, scratch: memoryview) -> None:
    start, stop = slabs.rows_span(r, first, count)
    rows = scratch[: stop - start]
    _read(f.loc, f.fd, r.entry.offset + start, rows, r)
    slabs.scatter_rows(r, out, first, count, rows)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What a write to the file changes (not ctime: unlinking a checked file changes that
    too, and then its bytes stay as they were)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_blocks(
    file_loc: storage.Location, fd: int, r: Read, start: int, stop: int, expected: int, scratch: memoryview
) -> None:
    """Check entry bytes ``[start, stop)`` (whole checksum blocks, ``expected`` their CRC)."""
    data = scratch[: stop - start]
    _read(file_loc, fd, r.entry.offset + start, data, r)
    check_run(file_loc, r, start, stop, expected, crc_of_bytes(data, start))


def _check_entry(file_loc: storage.Location, fd: int, r: Read, scratch: memoryview) -> None:
    """Check a whole entry against its one CRC, reading it a scratch buffer at a time."""
    e = r.entry
    actual = 0
    for start in range(0, e.size, len(scratch)):
        data = scratch[: min(len(scratch), e.size - start)]
        _read(file_loc, fd, e.offset + start, data, r)
        actual = crc.crc32c(data, actual)
    check_entry(file_loc, r, actual)


def _read(file_loc: storage.Location, fd: int, offset: int, data: memoryview, r: Read) -> None:
    try:
        storage.read_ranges(file_loc, [(offset, data)], fd=fd)
    except DataLossError as exc:
        raise DataLossError(f"{exc} (reading tensor {r.name!r})") from exc
