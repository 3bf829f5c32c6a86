"""What a restore reads, as plain data: one small immutable record per kind of read.

The planner (planner.py) turns the blocks wanted into these; the loads (fresh.py,
in_place.py) bind them to buffers and arrays afterwards. Each kind carries only what is
meaningful for it. Every read names its target (a position in the list of targets), the
stored entry it reads (the data file is ``entry.shard_id``, the bytes ``entry.offset +
span``) and ``span``: the entry-relative bytes it fetches, widened to whole checksum
blocks (or the whole entry, if it has a single CRC) so that every byte read is verified.

Where the bytes land in the target: ``region`` (relative to the stored ``piece``) goes to
the target's elements at ``at`` (relative to the target's block), of shape ``region.shape``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..format.entry import BundleEntry
from ..plan import Block, Shape, Span


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


@dataclass(frozen=True, slots=True)
class Wanted:
    """What the planner needs to know of a target: never its array."""

    name: str
    block: Block
    dtype: np.dtype
    contiguous: bool = True
    """Whether the target array is C-contiguous (bytes can land in it straight)."""

    @classmethod
    def of(cls, t: Target) -> Wanted:
        return cls(t.name, t.block, t.out.dtype, t.out.flags.c_contiguous)


@dataclass(frozen=True, slots=True)
class DirectRead:
    """The whole stored entry lands straight in the whole target (a large plain tensor,
    or piece, that is exactly the block wanted): no buffer, no copy."""

    target: int
    name: str
    entry: BundleEntry
    span: Span  # the whole entry


@dataclass(frozen=True, slots=True)
class WholeRead:
    """A small whole plain tensor that is the whole target: read with its neighbours into
    a shared buffer, then its bytes copied into the target as they are."""

    target: int
    name: str
    entry: BundleEntry
    span: Span  # the whole entry
    block: Block  # the whole tensor, and the target's block

    @property
    def piece(self) -> Block:
        return self.block

    @property
    def region(self) -> Block:
        return self.block

    @property
    def at(self) -> Shape:
        return self.block.offset


@dataclass(frozen=True, slots=True)
class RegionRead:
    """A region of a stored plain piece that is not contiguous in the target (or too small
    to read straight in): read into a shared buffer, then scattered into the target (or,
    if large, a slab of whole stored rows at a time: slabs.py)."""

    target: int
    name: str
    entry: BundleEntry
    span: Span
    piece: Block
    region: Block
    at: Shape


@dataclass(frozen=True, slots=True)
class RowsRead:
    """Whole rows of a stored piece (all trailing dimensions) that are contiguous in the
    target too, at least DIRECT_MIN_BYTES, in an entry with per-block checksums: entry
    bytes ``[start, stop)`` land straight in the target at byte ``dest``; the rest of
    ``span`` (parts of the checksum blocks at either end) in small buffers, so that the
    blocks can be verified. Resharding by rows."""

    target: int
    name: str
    entry: BundleEntry
    span: Span
    piece: Block
    region: Block
    at: Shape
    start: int
    stop: int
    dest: int


@dataclass(frozen=True, slots=True)
class StringRead:
    """A stored DT_STRING piece: the whole entry is read, decoded and checked against its
    CRC, then ``region`` of the values is copied into the target."""

    target: int
    name: str
    entry: BundleEntry
    span: Span  # the whole entry
    piece: Block
    region: Block
    at: Shape


Read = DirectRead | WholeRead | RegionRead | RowsRead | StringRead
