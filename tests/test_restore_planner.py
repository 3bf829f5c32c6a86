"""Property tests of the pure restore planner (shardsave.restore.planner), as test_plan.py
does for saves.

Random tensors are saved by N simulated ranks with random row, column or grid layouts,
the way the save path does it (make_save_plan, write_data_file, encode_rank_part,
merge_index: real data files in a temporary directory), and restored onto M ranks' random
blocks. The planned reads are applied with numpy slicing to the stored bytes and compared
with numpy slicing of the original; the bytes each rank's plan reads are checked against
the data files and against the bytes it needs; and the loads that carry a plan out (into
new arrays, and in place) give the same values, reading no more than the bound below.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shardsave import storage
from shardsave.errors import DataLossError, NotFoundError
from shardsave.format import dtypes, names
from shardsave.format.index import entry_key, parse_index
from shardsave.format.merge import encode_rank_part, merge_index
from shardsave.format.strings import decode_strings
from shardsave.plan import Block, BlockMeta, Span, align_span, make_save_plan, region_span
from shardsave.restore import slabs
from shardsave.restore.checks import DataFiles
from shardsave.restore.fresh import load
from shardsave.restore.in_place import InPlaceLoad
from shardsave.restore.planner import DIRECT_MIN_BYTES, plan_reads
from shardsave.restore.reads import (
    DirectRead,
    LoadStats,
    RowsRead,
    StringRead,
    Target,
    Wanted,
    WholeRead,
)
from shardsave.save.writer import CHECKSUM_BLOCK, write_data_file
from shardsave.storage import Writer

DTYPES = [np.float32, np.int64, np.uint8, np.float64]


def _slices(block: Block, origin=None) -> tuple:
    """Numpy's index of ``block`` (an array even for a scalar, thanks to the Ellipsis)."""
    origin = origin or (0,) * len(block.offset)
    return (
        ...,
        *(slice(o - z, o - z + n) for o, n, z in zip(block.offset, block.shape, origin, strict=True)),
    )


def _grid(shape, cuts) -> list[Block]:
    """The blocks of a grid cut at ``cuts[d]`` (sorted inner points) along each dimension."""
    bounds = [[0, *c, d] for c, d in zip(cuts, shape, strict=True)]
    blocks = [Block((), ())]
    for b in bounds:
        blocks = [
            Block((*blk.offset, lo), (*blk.shape, hi - lo))
            for blk in blocks
            for lo, hi in zip(b, b[1:], strict=False)
        ]
    return blocks


@st.composite
def cuts_of(draw, shape, kind):
    """Cut points per dimension: ``rows`` cuts dimension 0 only, ``cols`` the last only,
    ``grid`` any; ``whole`` none."""
    cuts = []
    for d, n in enumerate(shape):
        allowed = {"whole": False, "rows": d == 0, "cols": d == len(shape) - 1, "grid": True}[kind]
        points = draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=2)) if allowed and n > 1 else set()
        cuts.append(sorted(points))
    return cuts


@st.composite
def tensor(draw, name):
    """A tensor and its layouts: small ones (one CRC per entry), ones with checksum blocks,
    and ones large enough to be read straight into their targets."""
    size = draw(st.sampled_from(["large", "blocks", "small", "large", "blocks", "string"]))
    if size == "string":
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        values = np.array(
            [bytes(rng.integers(0, 256, rng.integers(0, 6), np.uint8)) for _ in range(math.prod(shape))]
            + [b""],
            dtype=object,
        )[:-1].reshape(shape)
        return name, values
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if size == "small":
        shape = tuple(
            draw(st.lists(st.integers(1, 7), min_size=draw(st.sampled_from([1, 1, 0])), max_size=3))
        )
    elif size == "blocks":  # 64 KiB .. 1 MiB: per-block checksums, read through buffers
        row = draw(st.sampled_from([64, 96, 1000]))
        shape = (
            draw(
                st.integers(CHECKSUM_BLOCK // (row * dtype.itemsize) + 1, (1 << 20) // (row * dtype.itemsize))
            ),
            row,
        )
    else:  # above DIRECT_MIN_BYTES: read straight into the targets, or by whole rows
        row = draw(st.sampled_from([256, 1024]))
        shape = (
            draw(st.integers((2 << 20) // (row * dtype.itemsize), (5 << 20) // (row * dtype.itemsize))),
            row,
        )
    # non-zero values, distinct unless bytes: a byte the plan forgets to read shows as a zero
    count = math.prod(shape)
    numbers = np.arange(count) % 255 + 1 if dtype.itemsize == 1 else np.arange(1, count + 1)
    return name, numbers.astype(dtype).reshape(shape)


@st.composite
def case(draw, kinds=("whole", "rows", "cols", "grid")):
    """(tensors, saved blocks per rank, restored blocks per rank)."""
    count = draw(st.integers(1, 3))
    tensors = [draw(tensor(f"t{i}")) for i in range(count)]
    n = draw(st.integers(1, 4))
    m = draw(st.integers(1, 4))
    saved: list[list[tuple[str, Block]]] = [[] for _ in range(n)]
    restored: list[list[tuple[str, Block]]] = [[] for _ in range(m)]
    for name, values in tensors:
        shape = values.shape
        for ranks, out in ((n, saved), (m, restored)):
            kind = draw(st.sampled_from(kinds)) if shape else "whole"
            for block in _grid(shape, draw(cuts_of(shape, kind))):
                out[draw(st.integers(0, ranks - 1))].append((name, block))
    return tensors, saved, restored


def save(directory: str, tensors, saved) -> tuple[storage.Location, object]:
    """Write the checkpoint the save path would: the plan, each rank's data file, the
    merged index. Returns the prefix and the parsed index."""
    values = dict(tensors)
    metas = [
        [
            BlockMeta(
                name,
                dtypes.to_tf(values[name].dtype),
                values[name].shape,
                block,
                values[name][_slices(block)].nbytes,
            )
            for name, block in blocks
        ]
        for blocks in saved
    ]
    plan = make_save_plan(metas)
    prefix = os.path.join(directory, "ckpt")
    n = len(saved)
    parts = []
    for rank, writes in enumerate(plan.writes):
        keys = [entry_key(a.name, a.extents) for a in writes]
        arrays = []
        for a in writes:
            name, block = saved[rank][a.index]
            arrays.append((values[name][_slices(block)] if a.extents is not None else values[name]).copy())
        out = Writer(storage.resolve(names.data_file_name(prefix, rank, n)), fsync=False)
        entries = write_data_file(out, keys, arrays, rank)
        out.close()
        parts.append(encode_rank_part(*entries, plan.sliced))
    index = parse_index(merge_index(n, parts, {k: (dt, shape) for k, (dt, shape, _) in plan.sliced.items()}))
    return storage.resolve(prefix), index


def apply(reads, wanted: list[Wanted], files: dict[int, np.ndarray]) -> tuple[list, list[np.ndarray]]:
    """Carry out a plan with numpy alone: each read takes only its span's bytes of the
    stored file. Returns the filled targets and how often each element was written."""
    outs = [
        np.zeros(w.block.shape, w.dtype) if w.dtype != object else np.full(w.block.shape, None)
        for w in wanted
    ]
    counts = [np.zeros(w.block.shape, np.int64) for w in wanted]
    for r in reads:
        e, span, w = r.entry, r.span, wanted[r.target]
        raw = files[e.shard_id][e.offset + span.start : e.offset + span.stop]
        assert len(raw) == span.stop - span.start  # inside the file
        if isinstance(r, DirectRead | WholeRead):
            assert span == Span(0, e.size)
            outs[r.target][...] = raw.view(w.dtype).reshape(w.block.shape)
            counts[r.target] += 1
            continue
        dest = tuple(slice(a, a + n) for a, n in zip(r.at, r.region.shape, strict=True))
        counts[r.target][dest] += 1
        if isinstance(r, StringRead):
            assert span == Span(0, e.size)
            stored, _ = decode_strings(bytes(raw), r.piece.shape)
            outs[r.target][dest + (...,)] = stored[_slices(r.region)]  # a 0-d view, even for a scalar
            continue
        entry_bytes = np.zeros(e.size, np.uint8)  # only the span is known
        entry_bytes[span.start : span.stop] = raw
        if isinstance(r, RowsRead):
            flat = outs[r.target].reshape(-1).view(np.uint8)
            flat[r.dest : r.dest + r.stop - r.start] = entry_bytes[r.start : r.stop]
            continue
        piece = entry_bytes.view(w.dtype).reshape(r.piece.shape)
        outs[r.target][dest] = piece[_slices(r.region)]
    return outs, counts


def check_spans(reads, wanted: list[Wanted], sizes: dict[int, int]) -> None:
    """Each read's span is what the planner documents: the whole entry if it has a single
    CRC (or holds strings), else the region's bytes widened to whole checksum blocks."""
    for r in reads:
        e, span = r.entry, r.span
        assert e.offset + e.size <= sizes[e.shard_id]
        assert 0 <= span.start < span.stop <= e.size
        if isinstance(r, DirectRead | WholeRead | StringRead) or not e.block_size:
            assert span == Span(0, e.size)
            if isinstance(r, DirectRead):
                assert (
                    e.size >= DIRECT_MIN_BYTES
                    and wanted[r.target].block.size * wanted[r.target].dtype.itemsize == e.size
                )
            if isinstance(r, WholeRead):
                assert e.size < DIRECT_MIN_BYTES and r.block == wanted[r.target].block
            continue
        itemsize = wanted[r.target].dtype.itemsize
        exact = region_span(r.piece.shape, r.region, itemsize)
        assert span == align_span(exact, e.block_size, e.size)
        if isinstance(r, RowsRead):
            assert (
                (r.start, r.stop)
                == (exact.start, exact.stop)
                == (exact.start, exact.start + r.region.size * itemsize)
            )
            assert r.stop - r.start >= DIRECT_MIN_BYTES


def _rows_layout(blocks_by_rank) -> bool:
    return all(all(o == 0 for o in b.offset[1:]) for blocks in blocks_by_rank for _, b in blocks)


def fetch_bound(r, itemsize: int) -> int:
    """The most a load fetches for read ``r``: an entry with one CRC whole; else the whole
    stored rows its region touches, plus a partial checksum block at each end of each slab
    of rows (a large region not contiguous in the file is fetched a slab at a time)."""
    e = r.entry
    if not e.block_size or isinstance(r, DirectRead | StringRead):
        return e.size
    row = e.size // r.piece.shape[0]
    return r.region.shape[0] * row + 2 * e.block_size * max(1, len(slabs.row_slabs(r)))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(case())
def test_planned_reads_restore_any_layout_onto_any_other(monkeypatch, c):
    monkeypatch.setattr(slabs, "SLAB_BYTES", 256 << 10)  # large regions by slabs of rows, also below 4 MiB
    tensors, saved, restored = c
    values = dict(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        prefix, index = save(tmp, tensors, saved)
        n = len(saved)
        files = {k: np.fromfile(names.data_file_name(prefix.path, k, n), np.uint8) for k in range(n)}
        sizes = {k: len(f) for k, f in files.items()}
        for blocks in restored:
            wanted = [Wanted(name, block, values[name].dtype) for name, block in blocks]
            plan = plan_reads(prefix, index, wanted, DataFiles(prefix, index))
            reads = [r for _, shard_reads in plan.shards for r in shard_reads]
            assert [k for k, _ in plan.shards] == sorted({r.entry.shard_id for r in reads})
            assert all(r.entry.shard_id == k for k, rs in plan.shards for r in rs)
            check_spans(reads, wanted, sizes)
            for r in reads:
                event(type(r).__name__)
                if (
                    r.entry.block_size
                    and r.span.stop - r.span.start > slabs.SLAB_BYTES
                    and not isinstance(r, RowsRead)
                ):
                    event("large region: by slabs of rows")

            outs, counts = apply(reads, wanted, files)
            for w, out, count in zip(wanted, outs, counts, strict=True):
                np.testing.assert_array_equal(out, values[w.name][_slices(w.block)])
                assert (count == 1).all()  # every element wanted read exactly once
            needed = sum(w.block.size * w.dtype.itemsize for w in wanted if w.dtype != object)
            assert plan.bytes_needed == needed

            # the plan asks for no element twice; its spans overlap only in checksum blocks
            # (row layouts), or where two targets' regions interleave in the file
            by_entry: dict[tuple[int, int], list] = {}
            for r in reads:
                by_entry.setdefault((r.entry.shard_id, r.entry.offset), []).append(r)
            if _rows_layout(saved) and _rows_layout(restored):
                for rs in by_entry.values():
                    e = rs[0].entry
                    spans = sorted((r.span.start, r.span.stop) for r in rs)
                    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
                        assert stop - start <= (e.block_size if e.block_size else e.size)

            # the loads carry the plan out: same values, reading within the bound
            targets = [Target(w.name, w.block, np.empty(w.block.shape, w.dtype)) for w in wanted]
            stats = load(prefix, index, targets)
            for t in targets:
                np.testing.assert_array_equal(t.out, values[t.name][_slices(t.block)])
            assert stats.bytes_needed == needed
            itemsize = {w.name: w.dtype.itemsize for w in wanted}
            bound = sum(fetch_bound(r, itemsize[r.name]) for r in reads)
            assert stats.bytes_read <= bound
            union = _union_bytes(reads)
            if _rows_layout(saved) and _rows_layout(restored):
                # whole rows: nothing beyond the region's bytes but block alignment
                assert union <= needed + sum(
                    2 * r.entry.block_size
                    if r.entry.block_size and not isinstance(r, StringRead)
                    else r.entry.size
                    for r in reads
                )
                assert stats.bytes_read <= needed + sum(_row_overhead(r) for r in reads)
            one_piece = all(
                r.span.stop - r.span.start <= slabs.SLAB_BYTES or isinstance(r, DirectRead | RowsRead)
                for r in reads
            )
            if sorted(saved_blocks(saved)) == sorted(saved_blocks(restored)) and one_piece:
                # each target a stored piece, each read in one piece: exactly the bytes needed
                event("restored as saved")
                assert stats.bytes_read == union == needed + _string_bytes(reads)

            # in place: what InPlaceLoad supports (the Saver gives it arrays of at least 1 MiB)
            plain = [t for t in targets if t.out.dtype != object and t.out.ndim]
            live = [Target(t.name, t.block, np.zeros_like(t.out)) for t in plain]
            in_place_stats = LoadStats()
            with InPlaceLoad(prefix, index) as in_place:
                in_place.check(live, in_place_stats)
                in_place.fill(in_place_stats)
            for t in live:
                np.testing.assert_array_equal(t.out, values[t.name][_slices(t.block)])
            assert in_place_stats.bytes_read == sum(
                r.span.stop - r.span.start
                for r in reads
                if wanted[r.target].dtype != object and wanted[r.target].block.shape
            )


def saved_blocks(blocks_by_rank):
    return [(name, tuple(b.offset), tuple(b.shape)) for blocks in blocks_by_rank for name, b in blocks]


def _string_bytes(reads) -> int:
    return sum(r.entry.size for r in reads if isinstance(r, StringRead))


def _union_bytes(reads) -> int:
    """The bytes of the data files that at least one read's span covers."""
    total = 0
    by_file: dict[int, list[tuple[int, int]]] = {}
    for r in reads:
        by_file.setdefault(r.entry.shard_id, []).append(
            (r.entry.offset + r.span.start, r.entry.offset + r.span.stop)
        )
    for spans in by_file.values():
        end = -1
        for start, stop in sorted(spans):
            start = max(start, end)
            if stop > start:
                total += stop - start
                end = stop
    return total


def test_the_read_kinds_of_common_layouts(tmp_path):
    """Which kind each layout gets: a large whole tensor straight in, a small one through a
    buffer, whole rows straight in, columns scattered, strings decoded."""
    big = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)  # 4 MiB
    small = np.arange(12, dtype=np.int64).reshape(3, 4)
    text = np.array([b"a", b"bc"], dtype=object)
    tensors = [("big", big), ("small", small), ("text", text)]
    saved = [
        [("big", Block((0, 0), (512, 1024))), ("small", Block.whole((3, 4))), ("text", Block.whole((2,)))],
        [("big", Block((512, 0), (512, 1024)))],
    ]
    prefix, index = save(str(tmp_path), tensors, saved)
    files = DataFiles(prefix, index)

    def kinds(wanted):
        plan = plan_reads(prefix, index, wanted, files)
        return [type(r).__name__ for _, rs in plan.shards for r in rs]

    f32 = big.dtype
    assert kinds([Wanted("big", Block((0, 0), (512, 1024)), f32)]) == ["DirectRead"]
    assert kinds([Wanted("big", Block((0, 0), (512, 1024)), f32, contiguous=False)]) == ["RegionRead"]
    assert kinds([Wanted("big", Block((256, 0), (512, 1024)), f32)]) == ["RowsRead", "RowsRead"]
    assert kinds([Wanted("big", Block((0, 0), (1024, 512)), f32)]) == ["RegionRead", "RegionRead"]
    assert kinds([Wanted("small", Block.whole((3, 4)), small.dtype)]) == ["WholeRead"]
    assert kinds([Wanted("small", Block((1, 0), (1, 4)), small.dtype)]) == ["RegionRead"]
    assert kinds([Wanted("text", Block((1,), (1,)), text.dtype)]) == ["StringRead"]
    rows = plan_reads(prefix, index, [Wanted("big", Block((256, 0), (512, 1024)), f32)], files).shards
    (_, [first]), (_, [second]) = rows
    assert (first.start, first.stop, first.dest) == (256 * 4096, 512 * 4096, 0)
    assert (second.start, second.stop, second.dest) == (0, 256 * 4096, 256 * 4096)
    assert first.at == (0, 0) and second.at == (256, 0)
    assert first.span == Span(256 * 4096, 512 * 4096)  # whole checksum blocks already


def test_plan_errors_are_the_loads_errors(tmp_path):
    """Planning raises what a restore raises: a missing tensor, a region outside the pieces."""
    values = np.arange(20, dtype=np.float32).reshape(4, 5)
    prefix, index = save(
        str(tmp_path), [("w", values)], [[("w", Block((0, 0), (2, 5)))], [("w", Block((2, 0), (2, 5)))]]
    )
    files = DataFiles(prefix, index)
    with pytest.raises(NotFoundError, match="tensor 'nope' not found in checkpoint"):
        plan_reads(prefix, index, [Wanted("nope", Block.whole((1,)), values.dtype)], files)
    with pytest.raises(
        DataLossError, match=r"cover 10 of the 15 elements of the requested region at offset \[2, 0\]"
    ):
        plan_reads(prefix, index, [Wanted("w", Block((2, 0), (3, 5)), values.dtype)], files)


def _row_overhead(r) -> int:
    """What a load fetches beyond a whole-row region's bytes: a partial checksum block at
    either end of each slab of rows it is fetched in (one slab unless large), or the rest
    of an entry with one CRC."""
    if not r.entry.block_size or isinstance(r, StringRead):
        return r.entry.size
    slabbed = isinstance(r, WholeRead) or hasattr(r, "piece") and not isinstance(r, RowsRead)
    count = len(slabs.row_slabs(r)) if slabbed and r.piece.shape else 1
    return 2 * r.entry.block_size * max(1, count)
