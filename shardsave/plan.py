"""Pure planning: which rank writes which block, and which bytes a reader must fetch.

Nothing here does I/O or talks to other ranks; the saver and the loader hand it plain data
(names, shapes, blocks, ranks) and carry out what it returns, so the planning can be
tested exhaustively in one process for any number of ranks.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple, TypeVar

from .errors import InvalidArgumentError

Shape = tuple[int, ...]
T = TypeVar("T")


class Block(NamedTuple):
    """A rectangular region of a tensor: start ``offset`` and ``shape`` in every dimension.

    A named tuple rather than a dataclass: plans of a million blocks build many of them.
    """

    offset: Shape
    shape: Shape

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> Shape:
        return tuple(map(operator.add, self.offset, self.shape))

    def intersect(self, other: Block) -> Block | None:
        """The common region, or None when they do not overlap (or it is empty)."""
        if self == other:
            return self if 0 not in self.shape else None
        lo = tuple(map(max, self.offset, other.offset))
        hi = tuple(map(min, self.end, other.end))
        shape = tuple(map(operator.sub, hi, lo))
        if any(n <= 0 for n in shape):
            return None
        return Block(lo, shape)

    def is_whole(self, global_shape: Shape) -> bool:
        return all(o == 0 for o in self.offset) and self.shape == tuple(global_shape)

    def extents(self) -> tuple[tuple[int, int], ...]:
        """TF's slice extents ``(start, length)``; like TF's partitioned variables, a
        dimension taken whole is written with its explicit length, not as ``-1``."""
        return tuple(zip(self.offset, self.shape, strict=True))

    @classmethod
    def from_extents(cls, extents: Sequence[tuple[int, int]], global_shape: Shape) -> Block:
        offset = tuple(start for start, _ in extents)
        shape = tuple(
            g if length == -1 else length for (_, length), g in zip(extents, global_shape, strict=True)
        )
        return cls(offset, shape)

    @classmethod
    def whole(cls, shape: Shape) -> Block:
        return cls((0,) * len(shape), tuple(shape))

    def spec(self, global_shape: Shape) -> str:
        """TF's text form, lengths spelled out as in partitioned variables: ``"10 4 0,4:0,4"``."""
        dims = ":".join(f"{o},{n}" for o, n in zip(self.offset, self.shape, strict=True))
        return " ".join(str(d) for d in global_shape) + (" " + dims if dims else "")


def rows_of(cls: type[T], *columns: Iterable[Any]) -> list[T]:
    """Named tuples of type ``cls`` from columns of their fields, built in C: a named
    tuple's own ``__new__`` is a Python function (~1 us each), and a first save of 20,000
    variables makes three of them per variable."""
    return list(map(tuple.__new__, repeat(cls), zip(*columns, strict=True)))


class BlockMeta(NamedTuple):
    """What a rank tells the others about one block it holds."""

    name: str
    dtype: int
    global_shape: Shape
    block: Block
    nbytes: int


class Assignment(NamedTuple):
    """One block to write: the rank and its local item index, and the slice extents."""

    name: str
    rank: int
    index: int
    extents: tuple[tuple[int, int], ...] | None
    """None for a plain entry (the block is the whole tensor)."""
    nbytes: int


@dataclass
class SavePlan:
    writes: list[list[Assignment]]
    """For each rank, the blocks it writes, in the order it writes them."""
    sliced: dict[str, tuple[int, Shape, list[tuple[tuple[int, int], ...]]]]
    """Tensors stored in pieces: name -> (dtype, global shape, every piece's extents)."""
    replicas: list[tuple[str, Block]] = field(default_factory=list)
    """Blocks held by more than one rank (or twice by one), written once: their copies
    must be equal (``Saver(check_replicas=True)`` compares their CRC32C)."""
    replica_items: list[list[tuple[int, int, int]]] = field(default_factory=list)
    """For each rank, the replicas it holds: (number in ``replicas``, its local item
    index, its position in ``writes[rank]`` or -1 if another holder writes it)."""

    def bytes_per_rank(self) -> list[int]:
        return [sum(a.nbytes for a in ws) for ws in self.writes]

    def share(self, rank: int) -> SavePlan:
        """What ``rank`` needs of the plan to write its file: its own writes and replica
        items (the other ranks' lists empty), and which of the tensors it writes are stored
        in pieces (their extents left out: only the coordinator merges them). The
        coordinator plans and keeps the whole plan; a rank gets this, so what it receives
        does not grow with the number of ranks."""
        size = len(self.writes)
        mine = self.writes[rank]
        sliced = {a.name: self.sliced[a.name][:2] + ((),) for a in mine if a.name in self.sliced}
        writes = [[] for _ in range(size)]
        writes[rank] = mine
        items = [[] for _ in range(size)]
        if self.replica_items:
            items[rank] = self.replica_items[rank]
        return SavePlan(writes, sliced, [], items)


def _describe_ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in sorted(set(ranks)))


def _check_agreement(name: str, holders: list[tuple[int, int, BlockMeta]]) -> None:
    variants: dict[tuple[int, Shape], list[int]] = defaultdict(list)
    for rank, _, meta in holders:
        variants[(meta.dtype, meta.global_shape)].append(rank)
    if len(variants) > 1:
        from .format.dtypes import tf_name

        detail = "; ".join(
            f"ranks {_describe_ranks(ranks)} have dtype {tf_name(dt)} and global shape {list(shape)}"
            for (dt, shape), ranks in variants.items()
        )
        raise InvalidArgumentError(f"ranks disagree on variable {name!r}: {detail}")


def _check_tiling(name: str, global_shape: Shape, blocks: dict[Block, list[int]]) -> None:
    for block, ranks in blocks.items():
        if len(block.shape) != len(global_shape) or any(
            o < 0 or e > g for o, e, g in zip(block.offset, block.end, global_shape, strict=True)
        ):
            raise InvalidArgumentError(
                f"variable {name!r}: block at offset {list(block.offset)} with shape "
                f"{list(block.shape)} on rank(s) {_describe_ranks(ranks)} lies outside the "
                f"global shape {list(global_shape)}"
            )
    items = sorted(blocks.items(), key=lambda kv: kv[0].offset)
    for i, (a, ranks_a) in enumerate(items):
        for b, ranks_b in items[i + 1 :]:
            if b.offset[0] >= a.end[0]:
                break
            if a.intersect(b) is not None:
                raise InvalidArgumentError(
                    f"variable {name!r}: blocks overlap: offset {list(a.offset)} shape "
                    f"{list(a.shape)} on rank(s) {_describe_ranks(ranks_a)} and offset "
                    f"{list(b.offset)} shape {list(b.shape)} on rank(s) {_describe_ranks(ranks_b)}"
                )
    covered = sum(b.size for b in blocks)
    total = math.prod(global_shape)
    if covered != total:
        raise InvalidArgumentError(
            f"variable {name!r}: blocks cover {covered} of {total} elements of global shape "
            f"{list(global_shape)}: a gap is left (blocks held by rank(s) "
            f"{_describe_ranks([r for rs in blocks.values() for r in rs])})"
        )


def make_save_plan(metas_by_rank: Sequence[Sequence[BlockMeta]]) -> SavePlan:
    """Validate every rank's blocks and decide who writes what.

    Identical blocks held by several ranks (replicated variables) are written once, by
    the holder with the fewest bytes assigned so far; blocks held by one rank are written
    by it. Raises InvalidArgumentError, identically on every rank, when ranks disagree on
    a variable's dtype or global shape, or its blocks overlap or leave a gap.
    """
    nranks = len(metas_by_rank)
    plain = _whole_and_unique(metas_by_rank)
    if plain is not None:
        return plain
    by_name: dict[str, list[tuple[int, int, BlockMeta]]] = {}
    for rank, metas in enumerate(metas_by_rank):
        for index, meta in enumerate(metas):
            holders = by_name.get(meta.name)
            if holders is None:
                by_name[meta.name] = [(rank, index, meta)]
            else:
                holders.append((rank, index, meta))

    load = [0] * nranks
    writes: list[list[Assignment]] = [[] for _ in range(nranks)]
    # (name, block) -> holders as (rank, index); one entry per distinct block
    distinct: list[tuple[str, Block, BlockMeta, list[tuple[int, int]]]] = []
    sliced: dict[str, tuple[int, Shape, list[tuple[tuple[int, int], ...]]]] = {}
    for name in sorted(by_name):
        holders = by_name[name]
        meta0 = holders[0][2]
        if len(holders) == 1 and meta0.block.shape == meta0.global_shape and not any(meta0.block.offset):
            # the common case, fast: one rank holds the whole tensor and writes it
            rank, index, _ = holders[0]
            load[rank] += meta0.nbytes
            writes[rank].append(Assignment(name, rank, index, None, meta0.nbytes))
            continue
        _check_agreement(name, holders)
        blocks: dict[Block, list[tuple[int, int]]] = defaultdict(list)
        block_meta: dict[Block, BlockMeta] = {}
        for rank, index, meta in holders:
            blocks[meta.block].append((rank, index))
            block_meta.setdefault(meta.block, meta)
        if math.prod(meta0.global_shape) == 0:
            whole = Block.whole(meta0.global_shape)
            distinct.append((name, whole, meta0, [h for hs in blocks.values() for h in hs]))
            continue
        if len(blocks) > 1 or not next(iter(blocks)).is_whole(meta0.global_shape):
            _check_tiling(name, meta0.global_shape, {b: [r for r, _ in hs] for b, hs in blocks.items()})
            sliced[name] = (
                meta0.dtype,
                meta0.global_shape,
                [b.extents() for b in sorted(blocks, key=lambda b: b.offset)],
            )
        for block, hs in blocks.items():
            distinct.append((name, block, block_meta[block], hs))

    # blocks held by one rank are its to write; then each replicated block, largest
    # first, goes to the holder with the fewest bytes so far
    single = [d for d in distinct if len(d[3]) == 1]
    shared = [d for d in distinct if len(d[3]) > 1]
    shared.sort(key=lambda d: (-d[2].nbytes, d[0], d[1].offset))
    for name, block, meta, hs in single + shared:
        rank, index = hs[0] if len(hs) == 1 else min(hs, key=lambda h: (load[h[0]], h[0]))
        load[rank] += meta.nbytes
        extents = block.extents() if name in sliced else None
        writes[rank].append(Assignment(name, rank, index, extents, meta.nbytes))
    if distinct:  # the fast path appended in name order already
        for ws in writes:
            ws.sort(key=lambda a: (a.name, a.extents or ()))
    replicas, replica_items = _replicas(shared, sliced, writes)
    return SavePlan(writes, sliced, replicas, replica_items)


def _whole_and_unique(metas_by_rank: Sequence[Sequence[BlockMeta]]) -> SavePlan | None:
    """The plan when every block is a whole tensor held by one rank (a single process,
    or ranks with variables of their own), made column-wise; None otherwise.

    The general planner's own fast path for such a tensor costs a few dict and list
    operations per name; a new Saver of 20,000 small variables pays it on its first save."""
    names = [m.name for metas in metas_by_rank for m in metas]
    if len(set(names)) != len(names):
        return None
    if not all(
        [
            m.block.shape == m.global_shape and not any(m.block.offset)
            for metas in metas_by_rank
            for m in metas
        ]
    ):
        return None
    writes = []
    for rank, metas in enumerate(metas_by_rank):
        order = sorted(range(len(metas)), key=[m.name for m in metas].__getitem__)
        chosen = [metas[i] for i in order]
        writes.append(
            rows_of(
                Assignment,
                [m.name for m in chosen],
                [rank] * len(order),
                order,
                [None] * len(order),
                [m.nbytes for m in chosen],
            )
        )
    return SavePlan(writes, {}, [], [[] for _ in metas_by_rank])


def _replicas(shared, sliced, writes: list[list[Assignment]]):
    """``SavePlan.replicas`` and ``replica_items`` from the blocks with several holders
    (empty tensors have no bytes to compare)."""
    shared = [d for d in shared if d[2].nbytes and math.prod(d[2].global_shape)]
    items: list[list[tuple[int, int, int]]] = [[] for _ in writes]
    if not shared:
        return [], items
    position: dict[tuple[int, str, tuple], int] = {}
    wanted = {(name, block.extents() if name in sliced else None) for name, block, _, _ in shared}
    for rank, ws in enumerate(writes):
        for pos, a in enumerate(ws):
            if (a.name, a.extents) in wanted:
                position[(rank, a.name, a.extents or ())] = pos
    replicas = []
    for number, (name, block, _, holders) in enumerate(shared):
        replicas.append((name, block))
        extents = block.extents() if name in sliced else ()
        for rank, index in holders:
            pos = position.get((rank, name, extents), -1)
            # one rank holding the block twice (two names are two variables): one writes
            items[rank].append((number, index, pos if pos >= 0 and writes[rank][pos].index == index else -1))
    return replicas, items


# ---------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, stop)`` of a stored piece that cover a region of it."""

    start: int
    stop: int


def region_span(piece_shape: Shape, region: Block, itemsize: int) -> Span:
    """The smallest byte range of a C-ordered piece that holds ``region`` (piece-relative)."""
    if not piece_shape:
        return Span(0, itemsize)
    strides = c_strides(piece_shape)
    first = sum(o * s for o, s in zip(region.offset, strides, strict=True))
    last = sum((o + n - 1) * s for o, n, s in zip(region.offset, region.shape, strides, strict=True))
    return Span(first * itemsize, (last + 1) * itemsize)


def c_strides(shape: Shape) -> Shape:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return tuple(strides)


def align_span(span: Span, block_size: int, total: int) -> Span:
    """Widen a span to whole checksum blocks so that every byte read can be verified."""
    start = span.start - span.start % block_size
    stop = min(total, -(-span.stop // block_size) * block_size)
    return Span(start, stop)


def coalesce(ranges: Sequence[tuple[int, int]], max_gap: int = 0) -> list[tuple[int, int]]:
    """Merge ``[start, stop)`` ranges that overlap or lie within ``max_gap`` of each other."""
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1] + max_gap:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]
