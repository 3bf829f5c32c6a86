"""``shardsave verify``: check every checksum of a checkpoint without restoring it.

The index's own table blocks, every stored entry's CRC32C (and its per-block CRCs where it
has them) and the data files' sizes, reading each data file in order a bounded chunk at a
time, so memory stays at a few chunks whatever the checkpoint's size (a DT_STRING entry is
decoded whole, as a restore does). The checks are the restore layer's (restore/checks.py
for the index fields, restore/verify.py for the bytes): what verify accepts, a restore reads.
Damage does not stop the run: every damaged tensor is reported, each naming its file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from . import storage
from .errors import DataLossError, NotFoundError
from .format import crc, dtypes, table
from .format.coding import DecodeError
from .format.entry import BundleEntry
from .plan import Block, Span
from .restore.checks import DataFiles, checked_pieces, index_damage, shard_file
from .restore.index import parse_index_or_raise, read_index_bytes
from .restore.reads import DirectRead, StringRead
from .restore.verify import check_entry, check_runs, checked_strings, crc_of_bytes

CHUNK_BYTES = 8 << 20
"""The most bytes of a data file read at once (a segment of a large entry, or a run of
small adjacent entries)."""
PARALLEL = 4
"""Chunks fetched at once (overlapping I/O on object stores); memory is this many chunks."""
_GAP = 64 << 10
"""Small entries at most this far apart are read with one request, the gap read and dropped."""


@dataclass
class Report:
    """The outcome of one checkpoint's verification."""

    prefix: str
    tensors: int = 0
    files: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    damage: list[str] = field(default_factory=list)
    damaged_tensors: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.damage

    def add(self, message: str, tensor: str | None = None) -> None:
        self.damage.append(" ".join(message.split()))
        if tensor is not None:
            self.damaged_tensors.add(tensor)


@dataclass
class _Part:
    """Entry bytes ``[start, stop)`` of one stored piece of tensor ``name``."""

    name: str
    entry: BundleEntry
    piece: Block
    start: int
    stop: int


@dataclass
class _Chunk:
    """One read: file bytes ``[offset, offset + size)``, holding ``parts``."""

    offset: int
    size: int
    parts: list[_Part]


def verify_checkpoint(
    loc: storage.Location,
    progress: Callable[[int, int], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    shards: Collection[int] | None = None,
) -> Report:
    """Check checkpoint ``loc`` (a prefix); damage is collected in the report. An index
    that does not parse, or a storage error, raises (nothing else can be checked).
    ``shards``: check only the entries in these data files (the fast tier's copies)."""
    t0 = time.monotonic()
    report = Report(loc.url)
    data = read_index_bytes(loc)
    index = parse_index_or_raise(loc, data)
    try:
        table.read_table(data)  # every block parsed and its keys in order, not only the header's
    except DecodeError as exc:
        raise DataLossError(f"{loc.url}.index is not a valid checkpoint index: {exc}") from exc
    files = DataFiles(loc, index)
    by_shard: dict[int, list[_Part]] = {}
    for name in index.entries:
        report.tensors += 1
        try:
            with index_damage(loc):
                _, pieces = checked_pieces(loc, index, name, files)
        except (DataLossError, NotFoundError) as exc:
            report.add(str(exc), name)
            continue
        for piece, entry in pieces:
            if shards is not None and entry.shard_id not in shards:
                continue
            by_shard.setdefault(entry.shard_id, []).append(_Part(name, entry, piece, 0, entry.size))
    index_sound = report.ok  # else entries are missing from by_shard: no file size to expect
    total = sum(p.entry.size for parts in by_shard.values() for p in parts)
    done = 0
    for shard_id in sorted(by_shard):
        parts = sorted(by_shard[shard_id], key=lambda p: (p.entry.offset, p.entry.size))
        file_loc = shard_file(loc, index, shard_id, parts[0].name)
        report.files += 1
        if index_sound:
            _check_file_size(report, file_loc, parts, files.size(shard_id, parts[0].name))
        checker = _Checker(file_loc, report)
        chunks = list(_chunks(parts, chunk_bytes))
        for first in range(0, len(chunks), PARALLEL):
            done += _check_group(file_loc, checker, chunks[first : first + PARALLEL])
            if progress is not None:
                progress(done, total)
    report.bytes_checked = total
    report.seconds = time.monotonic() - t0
    return report


def _check_group(file_loc: storage.Location, checker: _Checker, group: list[_Chunk]) -> int:
    """Fetch a few chunks at once and check them; their buffers go when this returns (so
    the next group's never coexist with them). Returns the entry bytes covered."""
    group = [c for c in group if not all(p.name in checker.failed for p in c.parts)]
    buffers = [bytearray(c.size) for c in group]
    covered = sum(p.stop - p.start for c in group for p in c.parts)
    try:
        ranges = [(c.offset, memoryview(b)) for c, b in zip(group, buffers, strict=True) if c.size]
        storage.read_ranges(file_loc, ranges)  # empty entries (no elements) need no request
    except DataLossError as exc:  # the file changed under us, or shrank: those tensors
        for c in group:
            for p in c.parts:
                checker.fail(p, f"{exc} (reading tensor {p.name!r})")
        return covered
    for c, buf in zip(group, buffers, strict=True):
        with memoryview(buf) as view:
            for p in c.parts:
                at = p.entry.offset + p.start - c.offset
                checker.check(p, view[at : at + p.stop - p.start])
    return covered


def _check_file_size(report: Report, file_loc: storage.Location, parts: list[_Part], size: int) -> None:
    """A data file is as long as its entries reach: shorter is caught per entry (checks.py),
    longer means bytes no entry accounts for (a file of another save, or appended to)."""
    end = max(p.entry.offset + p.entry.size for p in parts)
    if size > end:
        report.add(
            f"{file_loc.url}: data file is {size} bytes, its tensors end at byte {end} "
            f"({size - end} bytes more than the index accounts for)"
        )


def _chunks(parts: list[_Part], chunk_bytes: int):
    """The reads that cover ``parts`` (sorted by offset): a large entry in segments of whole
    checksum blocks, small adjacent entries together."""
    run: list[_Part] = []
    lo = hi = 0
    for p in parts:
        e = p.entry
        if e.size > chunk_bytes and e.dtype != dtypes.DT_STRING:
            if run:
                yield _Chunk(lo, hi - lo, run)
                run = []
            bs = e.block_size if e.block_size and e.block_crcs else 1
            step = max(bs, chunk_bytes // bs * bs)
            for start in range(0, e.size, step):
                stop = min(start + step, e.size)
                yield _Chunk(e.offset + start, stop - start, [_Part(p.name, e, p.piece, start, stop)])
            continue
        if run and (e.offset - hi > _GAP or e.offset < hi or e.offset + e.size - lo > chunk_bytes):
            yield _Chunk(lo, hi - lo, run)
            run = []
        if not run:
            lo = hi = e.offset
        run.append(p)
        hi = max(hi, e.offset + e.size)
    if run:
        yield _Chunk(lo, hi - lo, run)


class _Checker:
    """Checks the bytes of each entry as they arrive, in order: per-block CRCs per segment,
    the whole entry's CRC once its last segment is in."""

    def __init__(self, file_loc: storage.Location, report: Report):
        self.file_loc = file_loc
        self.report = report
        self.running: dict[tuple[str, int], int] = {}
        self.failed: set[str] = set()
        self._failed_entries: set[tuple[str, int]] = set()

    def fail(self, p: _Part, message: str) -> None:
        key = (p.name, p.entry.offset)
        if key not in self._failed_entries:
            self._failed_entries.add(key)
            self.failed.add(p.name)
            self.report.add(message, p.name)

    def check(self, p: _Part, data: memoryview) -> None:
        e, key = p.entry, (p.name, p.entry.offset)
        if key in self._failed_entries:
            return
        try:
            if e.dtype == dtypes.DT_STRING:
                piece = p.piece
                r = StringRead(0, p.name, e, Span(0, e.size), piece, Block.whole(piece.shape), piece.offset)
                checked_strings(self.file_loc, bytes(data), r)
                return
            r = DirectRead(0, p.name, e, Span(0, e.size))
            if e.block_size and e.block_crcs:
                check_runs(self.file_loc, r, Span(p.start, p.stop), crc_of_bytes(data, p.start))
            running = crc.crc32c(data, self.running.pop(key, 0))
            if p.stop < e.size:
                self.running[key] = running
            else:
                check_entry(self.file_loc, r, running)
        except DataLossError as exc:
            self.fail(p, str(exc))
