"""Pure read planning: an index and the blocks wanted -> the reads that fill them.

For every block wanted the planner intersects it with the stored pieces of its tensor
(every piece checked first: checks.py), and turns each intersection into a read of one
of the kinds in reads.py: which entry, which entry-relative bytes (widened to whole
checksum blocks, or the whole entry if it has one CRC), and where in the target they
land. It sees no array and reads no byte; the only outside fact it consults is the size
of each data file, through the ``DataFiles`` it is given (to check that every entry lies
inside its file before anything is allocated).

What one rank's plan reads (tests/test_restore_planner.py checks it): no element twice,
and each read's ``span`` is the whole entry if the entry has a single CRC, else the
smallest byte range of the piece holding the region (exactly the region's bytes for
whole rows; the rows between for columns) widened to whole checksum blocks. So spans of
one entry overlap only in a checksum block two regions share, in an entry read whole, or
where regions interleave in the file (column cuts). The loads fetch touching spans of
buffered reads once (fresh.py), so for whole-row layouts a rank fetches at most the bytes
it needs plus a partial checksum block at either end of each read (an entry with one CRC:
all of it); a region fetched a slab of rows at a time also fetches its whole stored rows,
and the checksum block at each slab boundary twice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DataLossError, NotFoundError
from ..format import dtypes
from ..format.entry import BundleEntry
from ..format.index import Index
from ..plan import Block, Span, align_span, region_span
from .checks import DataFiles, check_block_crcs, check_entry_size, checked_pieces, index_damage
from .lookup import pieces_for, wants_lookup
from .reads import DirectRead, Read, RegionRead, RowsRead, StringRead, Wanted, WholeRead

if TYPE_CHECKING:
    from .. import storage

DIRECT_MIN_BYTES = 1 << 20
"""Entries (and whole-row regions) this large are read straight into their targets."""


@dataclass(frozen=True, slots=True)
class Plan:
    shards: list[tuple[int, list[Read]]]
    """The reads, grouped by data file (``shard_id``), in shard order."""
    bytes_needed: int
    """The bytes of the plain elements wanted (strings count 0)."""


def plan_reads(prefix: storage.Location, index: Index, wanted: Sequence[Wanted], files: DataFiles) -> Plan:
    """The reads that fill ``wanted``, every entry they touch checked against its tensor
    and its data file (``checked_pieces``). ``prefix`` names the checkpoint in errors."""
    with index_damage(prefix):  # slice entries are decoded only now (bundle.Pieces)
        reads, needed = _plan(prefix, index, wanted, files)
    by_shard: dict[int, list[Read]] = defaultdict(list)
    for r in reads:
        by_shard[r.entry.shard_id].append(r)
    return Plan(sorted(by_shard.items()), needed)


def _plan(
    prefix: storage.Location, index: Index, wanted: Sequence[Wanted], files: DataFiles
) -> tuple[list[Read], int]:
    reads: list[Read] = []
    needed = 0
    checked: dict[str, tuple[BundleEntry, list[tuple[Block, BundleEntry]]]] = {}
    for i, t in enumerate(wanted):
        full = index.entries.get(t.name)
        if full is None:
            raise NotFoundError(f"{prefix.url}: tensor {t.name!r} not found in checkpoint")
        if t.block.shape == full.shape and full.dtype != dtypes.DT_STRING and t.name not in index.pieces:
            # fast path: a whole plain tensor (most of the variables of most checkpoints)
            size = t.block.size * t.dtype.itemsize
            if full.size != size:
                check_entry_size(prefix, t.name, full, t.block, t.dtype)
            check_block_crcs(prefix, t.name, full)
            files.check(t.name, full)
            needed += size
            if size >= DIRECT_MIN_BYTES:
                reads.append(DirectRead(i, t.name, full, Span(0, size)))
            else:
                reads.append(WholeRead(i, t.name, full, Span(0, size), t.block))
            continue
        if wants_lookup(index, t.name, t.block):  # a block of a many-piece tensor: its pieces only
            full, pieces = pieces_for(prefix, index, t.name, t.block, files)
        else:
            if t.name not in checked:
                checked[t.name] = checked_pieces(prefix, index, t.name, files)
            full, pieces = checked[t.name]
        string = full.dtype == dtypes.DT_STRING
        itemsize = dtypes.to_numpy(full.dtype).itemsize
        needed += t.block.size * (itemsize if not string else 0)
        covered = 0
        for piece, entry in pieces:
            inter = piece.intersect(t.block) if t.block.size else None
            if inter is None:
                continue
            covered += inter.size
            region = Block(tuple(a - b for a, b in zip(inter.offset, piece.offset, strict=True)), inter.shape)
            at = tuple(a - b for a, b in zip(inter.offset, t.block.offset, strict=True))
            if string:
                reads.append(StringRead(i, t.name, entry, Span(0, entry.size), piece, region, at))
                continue
            if (
                entry.size >= DIRECT_MIN_BYTES
                and inter == t.block
                and region.shape == piece.shape
                and t.contiguous
            ):
                reads.append(DirectRead(i, t.name, entry, Span(0, entry.size)))
                continue
            rows = _rows(t, piece, region, inter, entry, itemsize)
            if rows is not None:
                start, stop, dest = rows
                span = align_span(Span(start, stop), entry.block_size, entry.size)
                reads.append(RowsRead(i, t.name, entry, span, piece, region, at, start, stop, dest))
                continue
            reads.append(
                RegionRead(i, t.name, entry, _span(piece, region, entry, itemsize), piece, region, at)
            )
        if covered != t.block.size:
            raise DataLossError(
                f"{prefix.url}: the stored pieces of {t.name!r} cover {covered} of the "
                f"{t.block.size} elements of the requested region at offset "
                f"{list(t.block.offset)} with shape {list(t.block.shape)}"
            )
    return reads, needed


def _span(piece: Block, region: Block, entry: BundleEntry, itemsize: int) -> Span:
    """The entry bytes to read for ``region``: all of them if the entry has one CRC, else
    the region's byte range widened to whole checksum blocks."""
    if not entry.block_size:
        return Span(0, entry.size)
    return align_span(region_span(piece.shape, region, itemsize), entry.block_size, entry.size)


def _rows(
    t: Wanted, piece: Block, region: Block, inter: Block, entry: BundleEntry, itemsize: int
) -> tuple[int, int, int] | None:
    """Where a large region can be read straight into the target (resharding by rows):
    it must be contiguous in the stored piece (whole trailing dimensions) and in the
    target, and the entry must have per-block checksums so that the bytes around it can
    be verified without reading the whole entry. ``(start, stop)`` entry bytes to the
    target's byte ``dest``; None otherwise."""
    if not entry.block_size or not piece.shape or not t.contiguous:
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
    return start, start + nbytes, (inter.offset[0] - t.block.offset[0]) * row
