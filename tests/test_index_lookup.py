"""A rank restoring a block of a many-piece tensor finds its pieces by binary search over
the index (restore/lookup.py): it decodes only the pieces near its block, and damage in
what it uses (overlapping pieces, a hole, unsorted or repeated keys, a piece the full
entry does not list) is a DataLossError."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from shardsave import storage
from shardsave.errors import DataLossError
from shardsave.format import crc, table
from shardsave.format.entry import BundleEntry, encode_entry
from shardsave.format.index import BundleHeader, entry_key, parse_index
from shardsave.format.merge import encode_rank_part, merge_index
from shardsave.plan import Block
from shardsave.restore import lookup
from shardsave.restore.fresh import load
from shardsave.restore.reads import Target

PIECES, ROWS, COLS = 1000, 4, 8
NAME = "emb"


def _pieces(n=PIECES):
    return [((i * ROWS, ROWS), (0, COLS)) for i in range(n)]


def write(tmp_path, pieces=None, *, value=None, shape=None, order=None, extra=()):
    """A checkpoint of one tensor stored as ``pieces`` (extents, rows of ``value``) in one
    data file; ``order`` permutes the slice entries (unsorted keys), ``extra``: more raw
    (key, entry) items. Returns the prefix, the parsed index and the value."""
    pieces = _pieces() if pieces is None else pieces
    shape = shape or (PIECES * ROWS, COLS)
    value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) if value is None else value
    prefix = str(tmp_path / "ckpt")
    data, items = bytearray(), []
    for extents in pieces:
        rows = value[tuple(slice(s, s + n) for s, n in extents)]
        raw = rows.tobytes()
        entry = encode_entry(1, rows.shape, 0, len(data), len(raw), crc.masked_crc32c(raw))
        items.append((entry_key(NAME, extents), entry))
        data += raw
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    keys = [k for k, _ in items]
    if order is None:
        part = encode_rank_part(keys, b"".join(v for _, v in items), [len(v) for _, v in items], {NAME})
        index_bytes = merge_index(1, [part], {NAME: (1, shape)})
    else:
        full = BundleEntry(1, shape, slices=tuple(pieces)).encode()
        rows = [(b"", BundleHeader().encode()), *(items[i] for i in order), *extra, (NAME.encode(), full)]
        index_bytes = _raw_table(rows)
    with open(prefix + ".index", "wb") as f:
        f.write(index_bytes)
    return storage.resolve(prefix), parse_index(index_bytes), value


def _raw_table(items) -> bytes:
    """A table of ``items`` in the order given (build_table_flat does not sort)."""
    keys = [k for k, _ in items]
    values = [v for _, v in items]

    def column(chunks):
        lengths = np.array([len(c) for c in chunks], np.int64)
        flat = np.frombuffer(b"".join(chunks) + bytes(8), np.uint8)
        return table.Column(flat, np.cumsum(lengths) - lengths, lengths)

    return table.build_table_flat(column(keys), column(values), block_size=2048)


def restore(loc, index, block: Block) -> np.ndarray:
    out = np.empty(block.shape, np.float32)
    load(loc, index, [Target(NAME, block, out)])
    return out


@pytest.fixture
def counted(monkeypatch):
    """Counts the piece entries decoded and the whole data blocks parsed."""
    counts = {"entries": 0, "blocks": 0}
    decode, block = BundleEntry.decode.__func__, table.TableReader.block

    def counting_decode(cls, data):
        counts["entries"] += 1
        return decode(cls, data)

    def counting_block(self, i, views_over=None):
        counts["blocks"] += 1
        return block(self, i, views_over)

    monkeypatch.setattr(BundleEntry, "decode", classmethod(counting_decode))
    monkeypatch.setattr(table.TableReader, "block", counting_block)
    return counts


def test_a_row_block_of_a_many_piece_tensor_decodes_only_its_pieces(tmp_path, counted):
    loc, index, value = write(tmp_path)
    before = dict(counted)
    block = Block((401, 0), (10, COLS))  # rows 401..410: pieces 100, 101 and 102
    assert lookup.wants_lookup(index, NAME, block)
    np.testing.assert_array_equal(restore(loc, index, block), value[401:411])
    assert counted["entries"] - before["entries"] == 3
    assert counted["blocks"] == before["blocks"]  # no data block parsed whole


@pytest.mark.parametrize("rows", [(0, 1), (0, 4), (3, 2), (3996, 4), (1, 3998), (2000, 2000)])
def test_every_row_range_restores_its_rows(tmp_path, rows):
    loc, index, value = write(tmp_path)
    a, n = rows
    np.testing.assert_array_equal(restore(loc, index, Block((a, 0), (n, COLS))), value[a : a + n])


def test_a_column_block_of_rows_finds_the_pieces_that_reach_it_from_above(tmp_path):
    """Pieces cut along both dimensions: a piece starting at row 0 still reaches row 600."""
    shape = (1000, 8)
    pieces = [((0, 1000), (0, 2))]  # a left column of all rows, then row pieces of the rest
    pieces += [((i * 2, 2), (2, 6)) for i in range(500)]
    loc, index, value = write(tmp_path, sorted(pieces), shape=shape)
    block = Block((600, 0), (7, 8))
    assert lookup.wants_lookup(index, NAME, block)
    np.testing.assert_array_equal(restore(loc, index, block), value[600:607])


def test_the_whole_tensor_still_gets_every_check(tmp_path):
    loc, index, value = write(tmp_path)
    assert not lookup.wants_lookup(index, NAME, Block((0, 0), value.shape))
    np.testing.assert_array_equal(restore(loc, index, Block((0, 0), value.shape)), value)


def test_overlapping_pieces_in_the_wanted_block_are_data_loss(tmp_path):
    pieces = _pieces()
    pieces[101] = ((402, ROWS), (0, COLS))  # overlaps piece 100 (rows 400..403)
    loc, index, _ = write(tmp_path, pieces)
    with pytest.raises(DataLossError, match="overlap"):
        restore(loc, index, Block((400, 0), (8, COLS)))


def test_a_hole_in_the_wanted_block_is_data_loss(tmp_path):
    pieces = _pieces()
    del pieces[101]  # rows 404..407 held by no piece
    loc, index, _ = write(tmp_path, pieces)
    with pytest.raises(DataLossError, match="cover"):
        restore(loc, index, Block((400, 0), (8, COLS)))


def test_unsorted_keys_near_the_wanted_block_are_data_loss(tmp_path):
    order = list(range(PIECES))
    order[100], order[101] = 101, 100
    loc, index, _ = write(tmp_path, order=order)
    with pytest.raises(DataLossError, match="out of order"):
        restore(loc, index, Block((400, 0), (8, COLS)))


def test_a_repeated_key_in_the_wanted_block_is_data_loss(tmp_path):
    order = list(range(PIECES))
    order.insert(101, 100)
    loc, index, _ = write(tmp_path, order=order)
    with pytest.raises(DataLossError, match="out of order"):
        restore(loc, index, Block((400, 0), (8, COLS)))


def test_a_piece_its_full_entry_does_not_list_is_data_loss(tmp_path):
    pieces = _pieces()
    loc, index, _ = write(tmp_path, pieces, order=list(range(PIECES)))
    listed = [p for p in pieces if p[0][0] != 400]
    full = BundleEntry(1, (PIECES * ROWS, COLS), slices=tuple(listed)).encode()
    items = [(k, v) for k, v in _items_of(loc)]
    items[-1] = (NAME.encode(), full)
    data = _raw_table(items)
    with pytest.raises(DataLossError, match="not among the slices"):
        restore(loc, parse_index(data), Block((400, 0), (8, COLS)))


def _items_of(loc):
    with open(loc.path + ".index", "rb") as f:
        return table.read_table(f.read())


def test_a_piece_past_the_end_of_its_file_is_data_loss(tmp_path):
    loc, index, _ = write(tmp_path)
    with open(loc.path + ".data-00000-of-00001", "r+b") as f:
        f.truncate(401 * COLS * 4)
    with pytest.raises(DataLossError, match="file too short"):
        restore(loc, index, Block((400, 0), (8, COLS)))


@pytest.mark.parametrize("ranks", [8, 16, 64])
def test_a_matrix_saved_by_a_few_ranks_is_looked_up_too(tmp_path, counted, ranks):
    """From about six pieces on, a rank's rows cost the same whatever the number of ranks
    that saved: it decodes its own pieces, not the other ranks' (issue 15)."""
    rows = 16
    pieces = [((i * rows, rows), (0, COLS)) for i in range(ranks)]
    loc, index, value = write(tmp_path, pieces, shape=(ranks * rows, COLS))
    before = dict(counted)
    block = Block((3 * rows, 0), (rows, COLS))  # the fourth rank's rows, on as many ranks
    assert lookup.wants_lookup(index, NAME, block)
    np.testing.assert_array_equal(restore(loc, index, block), value[3 * rows : 4 * rows])
    assert counted["entries"] - before["entries"] <= 2


def test_a_tensor_of_four_pieces_still_gets_every_check(tmp_path):
    """Below the lookup's threshold every piece is checked, even one the block does not
    use: the last piece lies past the end of its file while the block reads the second."""
    pieces = [((i * ROWS, ROWS), (0, COLS)) for i in range(4)]
    loc, index, value = write(tmp_path, pieces, shape=(4 * ROWS, COLS))
    block = Block((ROWS, 0), (ROWS, COLS))
    assert not lookup.wants_lookup(index, NAME, block)
    np.testing.assert_array_equal(restore(loc, index, block), value[ROWS : 2 * ROWS])
    with open(loc.path + ".data-00000-of-00001", "r+b") as f:
        f.truncate(3 * ROWS * COLS * 4)
    with pytest.raises(DataLossError, match="file too short"):
        restore(loc, index, block)


@pytest.mark.parametrize("padding", ["repeated records", "a dtype after the records"])
def test_a_few_piece_tensor_with_a_padded_slice_list_still_gets_every_check(tmp_path, padding):
    """The lookup is chosen by the number of slice keys, not by the list's length: a
    crafted full entry of four pieces whose list is padded past LOOKUP_MIN_SLICE_BYTES
    (repeated records, or a dtype field among them, which protobuf would let override the
    head) is checked whole and is DataLossError (a fuzz finding: it restored)."""
    pieces = [((i * ROWS, ROWS), (0, COLS)) for i in range(4)]
    loc, _, _ = write(tmp_path, pieces, shape=(4 * ROWS, COLS), order=list(range(4)))
    block = Block((ROWS, 0), (ROWS, COLS))
    if padding == "repeated records":
        full = BundleEntry(1, (4 * ROWS, COLS), slices=tuple(pieces * 3)).encode()
        match = "lists 12 slices, the index holds 4"
    else:
        full = BundleEntry(1, (4 * ROWS, COLS), slices=tuple(pieces * 2)).encode() + b"\x08\x0e"
        match = "field tag 0x8 among its slices"
    items = _items_of(loc)
    items[-1] = (NAME.encode(), full)
    index = parse_index(_raw_table(items))
    assert index.pieces.listed(NAME).raw_len() >= lookup.LOOKUP_MIN_SLICE_BYTES
    assert not lookup.wants_lookup(index, NAME, block)
    with pytest.raises(DataLossError, match=match):
        restore(loc, index, block)


def test_pieces_are_counted_from_their_keys(tmp_path):
    _, index, _ = write(tmp_path)
    assert index.pieces.more_than(NAME, 5) and index.pieces.more_than(NAME, PIECES - 1)
    assert not index.pieces.more_than(NAME, PIECES)


def test_a_full_entrys_slice_list_stays_in_the_index_buffer(tmp_path):
    """parse_index keeps a full entry's list of slices as a view of the index's buffer
    (on a node that shares the index, every rank's copy of it was 144 MB at ten million
    pieces), and hands out only bytes: the raw records, each piece's extents, a pickle."""
    write(tmp_path)
    data = bytearray((tmp_path / "ckpt.index").read_bytes())
    listed = parse_index(memoryview(data)).pieces.listed(NAME)
    assert isinstance(listed._data, memoryview) and listed._data.obj is data
    raw = listed.raw()
    assert type(raw) is bytes and listed.raw_len() == len(raw) and raw in data
    assert len(listed) == PIECES and listed.extents(7) == listed[7] == ((7 * ROWS, ROWS), (0, COLS))
    assert pickle.loads(pickle.dumps(listed)) == listed
    # the same list as a whole-tensor read decodes it
    assert list(listed) == [tuple(p) for p in _pieces()]
