"""The coordinator's merge of every rank's index entries into one index file.

Each rank encodes its own entries (RankIndexPart) in parallel; the coordinator then only
adds one full entry per sliced tensor, sorts and concatenates, whatever the number of ranks.
Everything is column-wise (flat byte buffers, starts and lengths): ten thousand ranks of a
thousand pieces each are ten million entries, too many for a Python object each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from . import keysort, table
from .block import ragged_gather
from .entry import BundleEntry, slice_field
from .index import BundleHeader, entry_key
from .ordered_code import decode_slice_key, read_string, write_string


class RankIndexPart(NamedTuple):
    """What one rank sends the coordinator: its entries and slice protos, column-wise.

    Encoding happens on every rank in parallel, so the coordinator's merge is a sort and
    a gather, whatever the number of ranks; a few flat buffers also pickle fast.
    """

    records: bytes
    """Every entry this rank wrote as its key followed by its encoded BundleEntryProto,
    back to back: the coordinator copies an entry into a table block in one piece."""
    key_lengths: np.ndarray
    value_lengths: np.ndarray
    pieces: np.ndarray
    """Which entries (positions in the above) are pieces of a tensor in ``sliced``."""
    name_lengths: np.ndarray
    """For each piece, how many bytes its key's tensor part takes (``00``, the encoded
    name and its ``00 01`` terminator): pieces of one tensor share those bytes."""
    fields: bytes
    """For each piece its TensorSliceProto encoded as field 7 (``slices``) of the tensor's
    full entry, back to back, ready to concatenate."""
    field_lengths: np.ndarray


def records_of(keys: bytes, key_lengths: np.ndarray, values: bytes, value_lengths: np.ndarray) -> bytes:
    """Keys and values (each back to back) interleaved: key 0, value 0, key 1, ..."""
    key_lengths, value_lengths = np.asarray(key_lengths, np.int64), np.asarray(value_lengths, np.int64)
    src = np.frombuffer(keys + values, np.uint8)
    starts = np.stack(
        [np.cumsum(key_lengths) - key_lengths, len(keys) + np.cumsum(value_lengths) - value_lengths], axis=1
    ).ravel()
    return ragged_gather(src, starts, np.stack([key_lengths, value_lengths], axis=1).ravel()).tobytes()


def encode_rank_part(keys: list[bytes], values: bytes, lengths, sliced_names) -> RankIndexPart:
    """A rank's entries (keys, and their encodings back to back with their lengths), with
    the slice protos of the pieces of tensors in ``sliced_names``."""
    pieces, name_lengths, fields = [], [], []
    for i, key in enumerate(keys):
        if key[:1] == b"\x00":
            name, extents = decode_slice_key(key)
            if name in sliced_names:
                pieces.append(i)
                name_lengths.append(1 + len(write_string(name.encode("utf-8"))))
                fields.append(slice_field(extents))
    key_lengths, value_lengths = _lengths(keys), np.asarray(lengths, np.int64)
    return RankIndexPart(
        records_of(b"".join(keys), key_lengths, values, value_lengths),
        key_lengths,
        value_lengths,
        np.array(pieces, np.int64),
        np.array(name_lengths, np.int64),
        b"".join(fields),
        _lengths(fields),
    )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def merge_index(
    num_shards: int, parts: Sequence[RankIndexPart], sliced: Mapping[str, tuple[int, tuple[int, ...]]]
) -> bytearray:
    """The coordinator's merge: every rank's entries plus one full entry per sliced
    tensor (``sliced``: name -> (dtype, global shape)), listing its slices in key order
    (which is the order of their extents: slice keys sort as their numbers do)."""
    names = sorted(sliced)
    full_keys = [entry_key(name) for name in names]
    header = BundleHeader(num_shards=num_shards).encode()
    # One buffer: the header's record, every part's records, the full entries' keys (to
    # sort), then room for the full entries' records (key and value, made once sorted);
    # margins around it for the table's row gathers and keysort's word reads.
    field_bytes = sum(len(p.fields) for p in parts)
    key_bytes = sum(map(len, full_keys))
    head_bytes = sum(len(BundleEntry(*sliced[name]).encode()) for name in names)
    size = len(header) + sum(len(p.records) for p in parts) + 2 * key_bytes + field_bytes + head_bytes
    flat = np.zeros(2 * _MARGIN + size, np.uint8)
    key_len = _concat([np.zeros(1, np.int64), *(p.key_lengths for p in parts), _lengths(full_keys)])
    value_len = _concat(
        [_lengths([header]), *(p.value_lengths for p in parts), np.zeros(len(names), np.int64)]
    )
    key_start = np.empty(len(key_len), np.int64)
    pos, row = _MARGIN, 1
    flat[pos : pos + len(header)] = np.frombuffer(header, np.uint8)
    key_start[0], pos = pos, pos + len(header)
    for p in parts:
        n = len(p.key_lengths)
        flat[pos : pos + len(p.records)] = np.frombuffer(p.records, np.uint8)
        record_len = p.key_lengths + p.value_lengths
        key_start[row : row + n] = pos + np.cumsum(record_len) - record_len
        pos, row = pos + len(p.records), row + n
    full_rows = np.arange(row, row + len(names))
    key_start[full_rows] = pos + np.cumsum(key_len[full_rows]) - key_len[full_rows]
    flat[pos : pos + key_bytes] = np.frombuffer(b"".join(full_keys), np.uint8)
    pos += key_bytes

    order, shared, bad = keysort.sort_keys(flat, key_start, key_len)
    if bad is not None:
        i = order[bad]
        raise ValueError(f"ranks' index entries hold key {_key(flat, key_start, key_len, i)!r} twice")
    # the columns in key order, one at a time (ten million entries: 80 MB a column)
    key_start = key_start[order]
    key_len = key_len[order]
    value_len = value_len[order]
    fulls = _full_entries(parts, names, sliced, order, shared, flat, key_start, key_len)
    at = np.flatnonzero(order >= row)  # where the full entries sorted to
    which = (order[at] - row).tolist()
    del order
    for i, j in zip(at.tolist(), which, strict=True):
        record = np.frombuffer(full_keys[j] + fulls[j], np.uint8)
        assert pos + len(record) <= len(flat) - _MARGIN
        flat[pos : pos + len(record)] = record
        key_start[i], value_len[i], pos = pos, len(fulls[j]), pos + len(record)
    del fulls
    return table.build_table_flat(
        table.Column(flat, key_start, key_len),
        table.Column(flat, key_start + key_len, value_len),
        shared=shared,
    )


_MARGIN = 256


def _full_entries(parts, names, sliced, order, shared, key_flat, key_start, key_len) -> list[bytes]:
    """The full entry of every sliced tensor in ``names``: dtype, shape and the slice
    fields of its pieces in key order. ``key_start``/``key_len``: the sorted keys;
    ``order``: where each came from (entry 0 is the header, then the parts' entries);
    ``shared``: each sorted key's common prefix with the one before."""
    base = np.cumsum([1, *(len(p.key_lengths) for p in parts)])[:-1]
    piece = _concat([p.pieces + b for p, b in zip(parts, base, strict=True)])
    name_len = _concat([p.name_lengths for p in parts])
    field_len = _concat([p.field_lengths for p in parts])
    field_flat = np.frombuffer(b"".join(p.fields for p in parts), np.uint8)
    field_start = np.cumsum(field_len) - field_len
    # the pieces in key order, without a sort: mark their places in the sorted order
    row_of = np.full(len(order), -1, np.int64)  # entry -> piece row
    row_of[piece] = np.arange(len(piece))
    del piece
    rows = row_of[order]
    del row_of
    at = np.flatnonzero(rows >= 0)  # sorted positions of the pieces, in key order
    rows = rows[at]
    name_len = name_len[rows]
    field_start = field_start[rows]
    field_len = field_len[rows]
    del rows
    # a new tensor begins where the tensor part of the key differs from the previous
    # piece's: known from the sort's shared prefixes when the two keys are neighbours
    starts, lens = key_start[at], np.minimum(name_len, key_len[at])
    new = np.ones(len(at), bool)
    if len(at) > 1:
        same = (lens[1:] == lens[:-1]) & (shared[at[1:]] >= lens[1:])
        apart = np.flatnonzero((at[1:] != at[:-1] + 1) & (lens[1:] == lens[:-1]))
        if len(apart):  # other keys between them: compare the tensor parts
            a, b = apart, apart + 1
            equal = np.ones(len(apart), bool)
            for w in range(-(-int(lens.max()) // 8)):
                equal &= keysort.words(key_flat, starts[b], lens[b], w) == keysort.words(
                    key_flat, starts[a], lens[a], w
                )
            same[apart] = equal
        new[1:] = ~same
    first = np.flatnonzero(new).tolist()
    fields_of: dict[str, bytes] = {}
    for a, b in zip(first, [*first[1:], len(at)][: len(first)], strict=True):
        raw = key_flat[starts[a] : starts[a] + lens[a]].tobytes()
        name = read_string(raw, 1)[0].decode("utf-8")
        assert name in sliced and name not in fields_of, name
        fields_of[name] = ragged_gather(field_flat, field_start[a:b], field_len[a:b]).tobytes()
    return [BundleEntry(*sliced[name]).encode() + fields_of.get(name, b"") for name in names]


def _lengths(chunks: list[bytes]) -> np.ndarray:
    return np.fromiter(map(len, chunks), np.int64, len(chunks))


def _key(flat: np.ndarray, start: np.ndarray, length: np.ndarray, i: int) -> bytes:
    return flat[start[i] : start[i] + length[i]].tobytes()
