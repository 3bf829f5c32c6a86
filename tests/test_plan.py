"""Tests of the pure planner (shardsave.plan) and of partition_blocks and the partitioners.

Everything runs in one process: N ranks are simulated by N lists of BlockMeta, and a
restore on M ranks by intersecting M target blocks with the N saved ones, checked against
numpy index arrays.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsave.errors import InvalidArgumentError
from shardsave.partitioners import (
    fixed_size_partitioner,
    min_max_variable_partitioner,
    partition_blocks,
    variable_axis_size_partitioner,
)
from shardsave.plan import (
    Block,
    BlockMeta,
    Span,
    align_span,
    c_strides,
    coalesce,
    make_save_plan,
    region_span,
)

F32 = 1  # TF DataType numbers
I64 = 9
SHAPE = (13, 7)


def _slices(block: Block, origin=None) -> tuple[slice, ...]:
    origin = origin or (0,) * len(block.offset)
    return tuple(slice(o - z, o - z + n) for o, n, z in zip(block.offset, block.shape, origin, strict=True))


def _mask(shape, block: Block | None) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    if block is not None:
        mask[_slices(block)] = True
    return mask


# --------------------------------------------------------------------------------------
# Block


@st.composite
def shape_and_blocks(draw, count=2, max_ndim=3, min_dim=0):
    ndim = draw(st.integers(0, max_ndim))
    shape = tuple(draw(st.lists(st.integers(min_dim, 6), min_size=ndim, max_size=ndim)))
    blocks = []
    for _ in range(count):
        offset, size = [], []
        for d in shape:
            o = draw(st.integers(0, d))
            offset.append(o)
            size.append(draw(st.integers(0, d - o)))
        blocks.append(Block(tuple(offset), tuple(size)))
    return shape, blocks


@given(shape_and_blocks())
def test_intersect_matches_numpy(case):
    shape, (a, b) = case
    expected = _mask(shape, a) & _mask(shape, b)
    got = a.intersect(b)
    assert got == b.intersect(a)
    if got is None:
        assert not expected.any()
        assert math.prod(shape) == 0 or a.size == 0 or b.size == 0 or not expected.any()
    else:
        assert got.size > 0
        assert np.array_equal(_mask(shape, got), expected)
        assert got.intersect(a) == got and got.intersect(b) == got


def test_intersect_examples():
    assert Block((0, 0), (4, 4)).intersect(Block((2, 2), (4, 4))) == Block((2, 2), (2, 2))
    assert Block((0,), (4,)).intersect(Block((4,), (3,))) is None  # touching is not overlapping
    assert Block((), ()).intersect(Block((), ())) == Block((), ())  # a scalar is one element
    assert Block((0, 0), (0, 3)).intersect(Block((0, 0), (5, 3))) is None


@given(shape_and_blocks(count=1, min_dim=1))
def test_extents_round_trip(case):
    shape, (block,) = case
    assert block.extents() == tuple(zip(block.offset, block.shape, strict=True))
    assert Block.from_extents(block.extents(), shape) == block
    whole_dims = [
        (0, -1) if o == 0 and n == g else (o, n)
        for o, n, g in zip(block.offset, block.shape, shape, strict=True)
    ]
    assert Block.from_extents(whole_dims, shape) == block
    assert block.end == tuple(o + n for o, n in zip(block.offset, block.shape, strict=True))
    assert block.size == int(_mask(shape, block).sum())


def test_block_spec_and_whole():
    assert Block((0, 0), (4, 4)).spec((10, 4)) == "10 4 0,4:0,4"
    assert Block((4, 0), (3, 4)).spec((10, 4)) == "10 4 4,3:0,4"
    assert Block((0, 5), (4, 4)).spec((4, 9)) == "4 9 0,4:5,4"
    assert Block((), ()).spec(()) == ""
    assert Block.whole((10, 4)) == Block((0, 0), (10, 4))
    assert Block.whole((10, 4)).is_whole((10, 4))
    assert not Block((0, 0), (9, 4)).is_whole((10, 4))
    assert not Block((1, 0), (10, 4)).is_whole((11, 4))


# --------------------------------------------------------------------------------------
# region_span, align_span, c_strides, coalesce


def test_c_strides():
    assert c_strides((13, 7)) == (7, 1)
    assert c_strides((2, 3, 4)) == (12, 4, 1)
    assert c_strides((5,)) == (1,)
    assert c_strides(()) == ()
    for shape in [(2, 3, 4), (1, 5), (6,)]:
        assert tuple(s // 8 for s in np.zeros(shape, np.int64).strides) == c_strides(shape)


@st.composite
def piece_and_region(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    offset, size = [], []
    for d in shape:
        o = draw(st.integers(0, d - 1))
        offset.append(o)
        size.append(draw(st.integers(1, d - o)))
    return shape, Block(tuple(offset), tuple(size))


@given(piece_and_region(), st.sampled_from([np.uint8, np.int16, np.float32, np.int64, np.complex128]))
def test_region_span_holds_region_at_right_places(case, dtype):
    shape, region = case
    itemsize = np.dtype(dtype).itemsize
    ids = np.arange(math.prod(shape)).reshape(shape)  # element ids: their flat index
    piece = ids.astype(dtype)
    span = region_span(shape, region, itemsize)
    assert 0 <= span.start < span.stop <= piece.nbytes
    assert span.start % itemsize == 0 and span.stop % itemsize == 0
    window = np.frombuffer(piece.tobytes()[span.start : span.stop], dtype=dtype)
    wanted = ids[_slices(region)]
    # every element of the region sits in the window at (flat index - first)
    first = span.start // itemsize
    np.testing.assert_array_equal(window[wanted - first], piece[_slices(region)])
    # and the window is the smallest: it starts and ends with elements of the region
    assert first == wanted.min()
    assert span.stop // itemsize - 1 == wanted.max()


def test_region_span_examples():
    assert region_span((), Block((), ()), 4) == Span(0, 4)
    assert region_span((13, 7), Block((0, 0), (13, 7)), 4) == Span(0, 13 * 7 * 4)
    assert region_span((13, 7), Block((2, 0), (3, 7)), 4) == Span(2 * 7 * 4, 5 * 7 * 4)
    # a column: from its first to its last element
    assert region_span((13, 7), Block((0, 3), (13, 1)), 2) == Span(3 * 2, (12 * 7 + 3 + 1) * 2)


@given(st.integers(0, 10_000), st.integers(1, 5_000), st.integers(1, 4096), st.integers(0, 20_000))
def test_align_span(start, length, block_size, extra):
    total = start + length + extra
    span = Span(start, start + length)
    aligned = align_span(span, block_size, total)
    assert aligned.start <= span.start and span.stop <= aligned.stop <= total
    assert aligned.start % block_size == 0
    assert aligned.stop % block_size == 0 or aligned.stop == total
    # no more than the blocks that the span touches
    assert span.start - aligned.start < block_size
    assert aligned.stop - span.stop < block_size


ranges = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 30)).map(lambda t: (t[0], t[0] + t[1])), max_size=20
)


def _points(rs) -> set[int]:
    return {p for a, b in rs for p in range(a, b)}


@settings(max_examples=60)
@given(ranges, st.integers(0, 10))
def test_coalesce_properties(rs, max_gap):
    out = coalesce(rs, max_gap)
    assert out == sorted(out)
    assert all(a <= b for a, b in out)
    # consecutive outputs are farther apart than max_gap (nothing left to merge)
    assert all(b1 + max_gap < a2 for (_, b1), (a2, _) in itertools.pairwise(out))
    # every input lies inside one output; outputs start and stop where inputs do
    for a, b in rs:
        assert any(x <= a and b <= y for x, y in out)
    assert {a for a, _ in out} <= {a for a, _ in rs}
    assert {b for _, b in out} <= {b for _, b in rs}
    # only gaps of at most max_gap were filled in
    filled = _points(out) - _points(rs)
    if max_gap == 0:
        assert not filled
    covered = sorted(_points(rs))
    for p in filled:
        i = np.searchsorted(covered, p)
        assert 0 < i < len(covered) and covered[i] - covered[i - 1] - 1 <= max_gap
    assert coalesce(out, max_gap) == out
    assert len(coalesce(rs, max_gap + 5)) <= len(out)


def test_coalesce_examples():
    assert coalesce([]) == []
    assert coalesce([(10, 20), (0, 5), (5, 8)]) == [(0, 8), (10, 20)]
    assert coalesce([(10, 20), (0, 5), (5, 8)], max_gap=2) == [(0, 20)]
    assert coalesce([(0, 10), (2, 3)]) == [(0, 10)]
    assert coalesce([(0, 4), (6, 9)], max_gap=1) == [(0, 4), (6, 9)]
    assert coalesce([(0, 4), (6, 9)], max_gap=2) == [(0, 9)]


# --------------------------------------------------------------------------------------
# Layouts of a tensor over N ranks


def _cuts(size: int, n: int, kind: str) -> list[tuple[int, int]]:
    """(start, length) of n consecutive parts of ``size``; some may be empty when n > size."""
    if kind == "skewed" and size >= n:
        # rank i gets a share that grows with i, everyone at least one
        weights = np.arange(1, n + 1)
        extra = np.floor((size - n) * np.cumsum(weights) / weights.sum()).astype(int)
        lengths = 1 + np.diff(np.concatenate([[0], extra]))
        lengths[-1] += size - lengths.sum()
    else:
        base, rem = divmod(size, n)
        lengths = [base + (i < rem) for i in range(n)]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert sum(lengths) == size
    return [(int(s), int(n_)) for s, n_ in zip(starts, lengths, strict=True)]


def _grid(n: int) -> tuple[int, int]:
    rows = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return rows, n // rows


KINDS = ["rows", "rows_skewed", "cols", "grid", "grid_skewed"]


def layout(shape: tuple[int, int], n: int, kind: str) -> list[Block | None]:
    """The block each of n ranks holds (None: nothing of this tensor)."""
    skew = "skewed" if kind.endswith("skewed") else "even"
    if kind.startswith("rows"):
        grid = (n, 1)
    elif kind == "cols":
        grid = (1, n)
    else:
        grid = _grid(n)
    row_cuts = _cuts(shape[0], grid[0], skew)
    col_cuts = _cuts(shape[1], grid[1], skew)
    out: list[Block | None] = []
    for (r0, rn), (c0, cn) in itertools.product(row_cuts, col_cuts):
        out.append(Block((r0, c0), (rn, cn)) if rn and cn else None)
    return out


def _meta(name, block, global_shape=SHAPE, dtype=F32, itemsize=4):
    return BlockMeta(name, dtype, tuple(global_shape), block, block.size * itemsize)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", range(1, 9))
def test_layouts_tile(n, kind):
    count = np.zeros(SHAPE, int)
    for block in layout(SHAPE, n, kind):
        if block is not None:
            count[_slices(block)] += 1
    assert (count == 1).all()


def _written(plan) -> dict[tuple[str, tuple | None], list]:
    out: dict = {}
    for rank, writes in enumerate(plan.writes):
        for a in writes:
            assert a.rank == rank
            out.setdefault((a.name, a.extents), []).append(a)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", range(1, 9))
def test_save_plan_sharded_and_replicated(n, kind):
    blocks = layout(SHAPE, n, kind)
    metas = []
    for rank, block in enumerate(blocks):
        mine = [_meta("rep", Block.whole((5, 3)), (5, 3), I64, 8)]
        if block is not None:
            mine.append(_meta("w", block))
        if rank % 2:
            mine.append(_meta("odd", Block.whole((4,)), (4,)))  # replicated on some ranks
        metas.append(mine)
    plan = make_save_plan(metas)
    assert plan == make_save_plan(metas)  # deterministic: every rank computes the same
    written = _written(plan)
    # every piece exactly once, by a rank that holds it, pointing at that rank's item
    held = [b for b in blocks if b is not None]
    for a in (a for ws in plan.writes for a in ws):
        meta = metas[a.rank][a.index]
        assert meta.name == a.name and meta.nbytes == a.nbytes
        if a.extents is not None:
            assert Block.from_extents(a.extents, meta.global_shape) == meta.block
        else:
            assert meta.block.is_whole(meta.global_shape)
    if len(held) == 1:
        assert "w" not in plan.sliced
        assert [k for k in written if k[0] == "w"] == [("w", None)]
    else:
        dtype, gshape, extents = plan.sliced["w"]
        assert (dtype, gshape) == (F32, SHAPE)
        assert sorted(extents) == sorted(b.extents() for b in held)
        assert sorted(k[1] for k in written if k[0] == "w") == sorted(extents)
    assert all(len(v) == 1 for v in written.values())
    assert ("rep", None) in written and "rep" not in plan.sliced
    assert (("odd", None) in written) == (n > 1)
    if n > 1:
        assert written[("odd", None)][0].rank % 2 == 1
    total = sum(plan.bytes_per_rank())
    assert total == math.prod(SHAPE) * 4 + 15 * 8 + (16 if n > 1 else 0)
    # what the coordinator sends each rank: its own writes and replica items, and which of
    # the tensors it writes are sliced; nothing of the other ranks'
    for rank in range(n):
        share = plan.share(rank)
        assert share.writes[rank] == plan.writes[rank]
        assert share.replica_items[rank] == plan.replica_items[rank]
        assert not any(share.writes[r] or share.replica_items[r] for r in range(n) if r != rank)
        mine = {a.name for a in plan.writes[rank]}
        assert set(share.sliced) == mine & set(plan.sliced)
        assert all(share.sliced[k][:2] == plan.sliced[k][:2] for k in share.sliced)
        assert share.replicas == []


@settings(max_examples=60)
@given(st.integers(1, 8), st.lists(st.integers(1, 1 << 20), min_size=1, max_size=40))
def test_replicated_variables_balanced(n, sizes):
    metas = [
        [BlockMeta(f"v{i:02d}", F32, (s,), Block.whole((s,)), 4 * s) for i, s in enumerate(sizes)]
        for _ in range(n)
    ]
    plan = make_save_plan(metas)
    written = _written(plan)
    assert sorted(k[0] for k in written) == sorted(f"v{i:02d}" for i in range(len(sizes)))
    assert all(len(v) == 1 and v[0].extents is None for v in written.values())
    per_rank = plan.bytes_per_rank()
    assert sum(per_rank) == 4 * sum(sizes)
    assert max(per_rank) - min(per_rank) <= 4 * max(sizes)


@settings(max_examples=40)
@given(st.integers(2, 8), st.data())
def test_replicated_on_subsets_written_by_a_holder(n, data):
    holders = data.draw(st.lists(st.sets(st.integers(0, n - 1), min_size=1), min_size=1, max_size=12))
    metas = [[] for _ in range(n)]
    for i, hs in enumerate(holders):
        for r in sorted(hs):
            metas[r].append(BlockMeta(f"v{i}", F32, (3,), Block.whole((3,)), 12))
    plan = make_save_plan(metas)
    written = _written(plan)
    for i, hs in enumerate(holders):
        (a,) = written[(f"v{i}", None)]
        assert a.rank in hs


def test_identical_blocks_on_several_ranks_are_not_an_overlap():
    # rows 0-6 on ranks 0 and 2, rows 7-12 on ranks 1 and 3 (a replicated shard)
    top, bottom = Block((0, 0), (7, 7)), Block((7, 0), (6, 7))
    metas = [[_meta("w", b)] for b in (top, bottom, top, bottom)]
    plan = make_save_plan(metas)
    written = _written(plan)
    assert sorted(written) == [("w", top.extents()), ("w", bottom.extents())]
    assert written[("w", top.extents())][0].rank in (0, 2)
    assert written[("w", bottom.extents())][0].rank in (1, 3)
    assert plan.sliced["w"][2] == [top.extents(), bottom.extents()]
    # both writers are different ranks: the two copies balance
    assert sorted(a.rank for v in written.values() for a in v) in ([0, 1], [0, 3], [1, 2], [2, 3])


def test_empty_blocks_on_some_ranks_are_accepted():
    metas = [[_meta("w", Block((0, 0), (13, 7)))], [_meta("w", Block((13, 0), (0, 7)))], []]
    plan = make_save_plan(metas)
    pieces = [a for ws in plan.writes for a in ws]
    assert sum(a.nbytes for a in pieces) == 13 * 7 * 4
    assert {a.rank for a in pieces if a.nbytes} == {0}


def test_empty_tensor_split_over_ranks_is_written_with_its_global_shape(tmp_path):
    # a [0, 8] tensor split in columns: the plan stores it as one plain entry, and the
    # saver writes that entry with the global shape, not the shape of one holder's block
    metas = [[_meta("e", Block((0, 0), (0, 4)), (0, 8))], [_meta("e", Block((0, 4), (0, 4)), (0, 8))]]
    plan = make_save_plan(metas)
    (a,) = [a for ws in plan.writes for a in ws]
    assert a.extents is None and "e" not in plan.sliced
    import numpy as np

    import shardsave as ss

    parts = [
        ss.Variable("e", np.zeros((0, 4)), global_shape=(0, 8), offset=(0, c), register=False) for c in (0, 4)
    ]
    ss.Saver({"e": parts}).save(str(tmp_path / "m"))
    assert ss.list_variables(str(tmp_path / "m")) == [("e", [0, 8])]
    assert ss.load_variable(str(tmp_path / "m"), "e").shape == (0, 8)


def test_empty_tensor_replicated():
    metas = [[_meta("e", Block.whole((0, 3)), (0, 3))] for _ in range(3)]
    plan = make_save_plan(metas)
    (a,) = [a for ws in plan.writes for a in ws]
    assert a.extents is None and a.nbytes == 0
    assert "e" not in plan.sliced


# --------------------------------------------------------------------------------------
# make_save_plan errors


def _raises(metas, *fragments):
    with pytest.raises(InvalidArgumentError) as info:
        make_save_plan(metas)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def test_ranks_disagree_on_global_shape():
    metas = [
        [_meta("w", Block((0, 0), (7, 7)))],
        [_meta("w", Block((7, 0), (6, 8)), (13, 8))],
        [_meta("w", Block((0, 0), (7, 7)))],
    ]
    msg = _raises(metas, "'w'", "[13, 7]", "[13, 8]")
    assert "ranks 0, 2" in msg and "ranks 1" in msg


def test_ranks_disagree_on_dtype():
    metas = [
        [_meta("w", Block.whole((3,)), (3,))],
        [_meta("w", Block.whole((3,)), (3,), dtype=I64, itemsize=8)],
    ]
    _raises(metas, "'w'", "float32", "int64", "ranks 0", "ranks 1")


def test_overlapping_blocks():
    metas = [
        [_meta("other", Block.whole((2,)), (2,))],
        [_meta("w", Block((0, 0), (8, 7)))],
        [_meta("w", Block((6, 0), (7, 7)))],
    ]
    msg = _raises(metas, "'w'", "overlap", "rank(s) 1", "rank(s) 2")
    assert "other" not in msg


def test_overlapping_blocks_in_columns():
    metas = [[_meta("w", Block((0, 0), (13, 4)))], [_meta("w", Block((0, 3), (13, 4)))]]
    _raises(metas, "'w'", "overlap", "rank(s) 0", "rank(s) 1")


def test_whole_and_partial_copies_overlap():
    metas = [[_meta("w", Block.whole(SHAPE))], [_meta("w", Block((0, 0), (5, 7)))]]
    _raises(metas, "'w'", "overlap", "0", "1")


def test_gap():
    metas = [[_meta("w", Block((0, 0), (6, 7)))], [_meta("w", Block((7, 0), (6, 7)))]]
    _raises(metas, "'w'", "gap", "0, 1")


def test_block_outside_global_shape():
    metas = [[_meta("w", Block((0, 0), (7, 7)))], [_meta("w", Block((7, 0), (7, 7)))]]
    _raises(metas, "'w'", "outside", "rank(s) 1")


def test_single_block_with_offset_outside_global_shape():
    metas = [[_meta("w", Block((2, 0), SHAPE))]]
    _raises(metas, "'w'", "outside", "rank(s) 0")


def test_block_rank_differs_from_global_rank():
    metas = [[_meta("w", Block((0,), (13,)))]]
    _raises(metas, "'w'")


@settings(max_examples=50)
@given(st.integers(2, 8), st.sampled_from(KINDS), st.data())
def test_any_moved_block_is_rejected(n, kind, data):
    """Shift one rank's block by one row or column: an overlap, a gap or out of bounds."""
    blocks = layout(SHAPE, n, kind)
    ranks = [r for r, b in enumerate(blocks) if b is not None]
    victim = data.draw(st.sampled_from(ranks))
    dim = data.draw(st.integers(0, 1))
    step = data.draw(st.sampled_from([-1, 1]))
    b = blocks[victim]
    offset = list(b.offset)
    offset[dim] += step
    if offset[dim] < 0:
        offset[dim] = b.offset[dim] + 1
    blocks[victim] = Block(tuple(offset), b.shape)
    metas = [[_meta("w", blk)] if blk is not None else [] for blk in blocks]
    with pytest.raises(InvalidArgumentError, match="'w'"):
        make_save_plan(metas)


# --------------------------------------------------------------------------------------
# Reshard: saved on N ranks, restored on M


def _saved_blocks(n: int, kind: str) -> list[Block]:
    """The pieces of a checkpoint saved on n ranks, as the plan records them."""
    blocks = layout(SHAPE, n, kind)
    plan = make_save_plan([[_meta("w", b)] if b is not None else [] for b in blocks])
    if "w" not in plan.sliced:
        return [Block.whole(SHAPE)]
    return [Block.from_extents(ext, SHAPE) for ext in plan.sliced["w"][2]]


RESHARD_KINDS = ["rows", "cols", "grid", "grid_skewed"]


@pytest.mark.parametrize("save_kind", RESHARD_KINDS)
@pytest.mark.parametrize("restore_kind", RESHARD_KINDS)
def test_reshard_intersections_tile_every_target(save_kind, restore_kind):
    for n, m in itertools.product(range(1, 9), range(1, 9)):
        saved = _saved_blocks(n, save_kind)
        for target in layout(SHAPE, m, restore_kind):
            if target is None:
                continue
            count = np.zeros(target.shape, int)
            for piece in saved:
                inter = target.intersect(piece)
                if inter is not None:
                    count[_slices(inter, target.offset)] += 1
            assert (count == 1).all(), (n, save_kind, m, restore_kind, target)


@pytest.mark.parametrize(("n", "m"), [(8, 4), (4, 8), (4, 3), (3, 4), (1, 8), (8, 1), (5, 7), (6, 6)])
@pytest.mark.parametrize(
    ("save_kind", "restore_kind"),
    [("rows", "cols"), ("grid", "rows_skewed"), ("cols", "grid_skewed"), ("grid_skewed", "grid")],
)
def test_reshard_reads_right_bytes(n, m, save_kind, restore_kind):
    """Fill every target block from the saved pieces' bytes via region_span."""
    full = np.arange(math.prod(SHAPE), dtype=np.int32).reshape(SHAPE) * 3 - 50
    itemsize = full.itemsize
    saved = [(p, full[_slices(p)].tobytes()) for p in _saved_blocks(n, save_kind)]
    for target in layout(SHAPE, m, restore_kind):
        if target is None:
            continue
        out = np.full(target.shape, -1, np.int32)
        for piece, data in saved:
            inter = target.intersect(piece)
            if inter is None:
                continue
            region = Block(tuple(a - b for a, b in zip(inter.offset, piece.offset, strict=True)), inter.shape)
            span = region_span(piece.shape, region, itemsize)
            window = np.frombuffer(data[span.start : span.stop], np.int32)
            flat = np.ravel_multi_index(
                np.ix_(*(range(o, o + s) for o, s in zip(region.offset, region.shape, strict=True))),
                piece.shape,
            )
            out[_slices(inter, target.offset)] = window[flat - span.start // itemsize]
        np.testing.assert_array_equal(out, full[_slices(target)])


# --------------------------------------------------------------------------------------
# partition_blocks and the partitioners


@pytest.mark.parametrize(
    ("shape", "partitions"),
    [
        ((10, 4), [3, 1]),
        ((13, 7), [8, 1]),
        ((13, 7), [1, 7]),
        ((7,), [7]),
        ((5, 3, 2), [2, 3, 1]),
        ((13, 7), [3, 2]),
        ((4,), [1]),
        ((), []),
    ],
)
def test_partition_blocks_tile_and_layout(shape, partitions):
    blocks = partition_blocks(shape, partitions)
    assert len(blocks) == math.prod(partitions)
    count = np.zeros(shape, int)
    for b in blocks:
        count[_slices(b)] += 1
    assert (count == 1).all()
    # along each axis the first size % n parts are one larger
    for axis, n in enumerate(partitions):
        lengths = sorted({(b.offset[axis], b.shape[axis]) for b in blocks})
        base, extra = divmod(shape[axis], n)
        assert [ln for _, ln in lengths] == [base + 1] * extra + [base] * (n - extra)
    # row-major over the grid of parts
    assert blocks == sorted(blocks, key=lambda b: b.offset)


def test_partition_blocks_examples():
    assert partition_blocks((10, 4), [3, 1]) == [
        Block((0, 0), (4, 4)),
        Block((4, 0), (3, 4)),
        Block((7, 0), (3, 4)),
    ]
    assert partition_blocks((4, 9), [1, 2]) == [Block((0, 0), (4, 5)), Block((0, 5), (4, 4))]
    with pytest.raises(ValueError):
        partition_blocks((10, 4), [3])


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def test_partition_blocks_match_tf(tf):
    cases = [((10, 4), 0, k) for k in (1, 2, 3, 4, 7, 10)] + [((13, 7), 1, k) for k in (2, 3, 5, 7)]
    cases += [((7,), 0, k) for k in (2, 3, 6)] + [((5, 3, 2), 1, 2), ((5, 3, 2), 2, 2), ((9, 3, 2), 0, 4)]
    graph = tf.Graph()
    with graph.as_default():
        for i, (shape, axis, k) in enumerate(cases):
            pv = tf.compat.v1.get_variable(
                f"v{i}",
                shape=shape,
                initializer=tf.compat.v1.zeros_initializer(),
                partitioner=tf.compat.v1.fixed_size_partitioner(k, axis),
            )
            theirs = [
                Block(tuple(v._get_save_slice_info().var_offset), tuple(v._get_save_slice_info().var_shape))
                for v in pv
            ]
            partitions = fixed_size_partitioner(k, axis)(shape)
            assert partition_blocks(shape, partitions) == theirs, (shape, axis, k)


PARTITIONER_SHAPES = [(10, 4), (1000, 64), (3, 5000), (7,), (100, 3, 2), (1, 1)]
PARTITIONER_DTYPES = ["float32", "float64", "int8", "string"]


def _tf_call(tf, partitioner, shape, dtype):
    return list(partitioner(shape=tf.TensorShape(shape), dtype=tf.as_dtype(dtype)))


def _np_dtype(dtype):
    return np.dtype(object) if dtype == "string" else np.dtype(dtype)


@pytest.mark.parametrize("dtype", PARTITIONER_DTYPES)
def test_partitioners_match_tf(tf, dtype):
    v1 = tf.compat.v1
    for shape in PARTITIONER_SHAPES:
        axes = range(len(shape))
        for axis, k in itertools.product(axes, (1, 2, 3, 8)):
            if k <= shape[axis]:
                assert fixed_size_partitioner(k, axis)(shape, dtype=_np_dtype(dtype)) == _tf_call(
                    tf, v1.fixed_size_partitioner(k, axis), shape, dtype
                ), (shape, axis, k)
        for axis, max_bytes, max_shards in itertools.product(axes, (1, 100, 4096, 1 << 20), (None, 3)):
            ours = variable_axis_size_partitioner(max_bytes, axis, max_shards=max_shards)(
                shape, dtype=_np_dtype(dtype)
            )
            theirs = _tf_call(
                tf, v1.variable_axis_size_partitioner(max_bytes, axis, max_shards=max_shards), shape, dtype
            )
            assert ours == theirs, (shape, axis, max_bytes, max_shards)
        for axis, max_parts, min_slice in itertools.product(axes, (1, 4, 100), (64, 4096, 256 << 10)):
            ours = min_max_variable_partitioner(max_parts, axis, min_slice)(shape, dtype=_np_dtype(dtype))
            theirs = _tf_call(tf, v1.min_max_variable_partitioner(max_parts, axis, min_slice), shape, dtype)
            assert ours == theirs, (shape, axis, max_parts, min_slice)


def test_replicas_and_their_items_name_every_holder():
    """A block held by two ranks is one replica; each holder's item says which of its
    items it is and where it is written (by exactly one holder); a rank's own block and an
    empty replicated tensor are no replicas."""
    rep = Block.whole((5, 3))
    metas = [
        [_meta("own", Block.whole((2,)), (2,)), _meta("rep", rep, (5, 3), I64, 8)],
        [_meta("rep", rep, (5, 3), I64, 8), _meta("e", Block.whole((0, 3)), (0, 3))],
        [_meta("e", Block.whole((0, 3)), (0, 3))],
    ]
    plan = make_save_plan(metas)
    assert plan.replicas == [("rep", rep)]
    assert plan.replica_items[2] == []
    (item0,), (item1,) = plan.replica_items[0], plan.replica_items[1]
    assert (item0[:2], item1[:2]) == ((0, 1), (0, 0))  # replica 0, at local index 1 and 0
    writer = 0 if item0[2] >= 0 else 1
    assert [item0[2], item1[2]].count(-1) == 1  # the other holder does not write it
    assert plan.writes[writer][(item0, item1)[writer][2]].name == "rep"


def test_coalesce_merges_only_touching_ranges_by_default():
    assert coalesce([(3, 5), (0, 2), (5, 6)]) == [(0, 2), (3, 6)]
    assert coalesce([(3, 5), (0, 2), (5, 6)], 1) == [(0, 6)]


def test_a_replica_goes_to_the_holder_with_less_to_write():
    """Rank 0 writes its own large tensor, so the block both hold is rank 1's to write."""
    rep = Block.whole((4,))
    metas = [
        [_meta("big", Block.whole((1000,)), (1000,)), _meta("rep", rep, (4,))],
        [_meta("rep", rep, (4,))],
    ]
    plan = make_save_plan(metas)
    assert [[a.name for a in ws] for ws in plan.writes] == [["big"], ["rep"]]
    assert plan.bytes_per_rank() == [4000, 16]


def test_spans_are_frozen_plain_data():
    span = Span(0, 8)
    assert {span: 1}[Span(0, 8)] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        span.start = 4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c", "d", "e", "w/x", "w/y", "zz"]),
                st.lists(st.integers(0, 4), max_size=2),
            ),
            max_size=5,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_the_column_wise_plan_of_whole_tensors_is_the_general_one(ranks):
    """``make_save_plan``'s fast path (every block whole, every name on one rank) gives
    exactly the plan of the general planner; anything else falls through to it."""
    import shardsave.plan as plan_module

    seen: set[str] = set()
    metas_by_rank = []
    for rank_vars in ranks:
        metas = []
        for name, shape in rank_vars:
            if name in seen and len(metas_by_rank) % 2:  # sometimes a replicated name
                continue
            seen.add(name)
            shape = tuple(shape)
            metas.append(BlockMeta(name, 1, shape, Block((0,) * len(shape), shape), 4 * math.prod(shape)))
        metas_by_rank.append(metas)
    try:
        fast = make_save_plan(metas_by_rank)
    except InvalidArgumentError as exc:
        fast = str(exc)
    general_only = plan_module._whole_and_unique
    try:
        plan_module._whole_and_unique = lambda metas: None
        try:
            general = make_save_plan(metas_by_rank)
        except InvalidArgumentError as exc:
            general = str(exc)
    finally:
        plan_module._whole_and_unique = general_only
    assert fast == general
