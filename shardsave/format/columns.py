"""Many plain entries at once, column-wise in numpy: the bulk twins of entry.py's encoder
and decoder, for the save of many tensors and the parse of an index of many tensors.

A plain entry has fields 1-6 only (no slices, no checksum blocks), in number order, as TF
and shardsave write them. The bytes these produce and accept are exactly those of
``encode_entry`` and ``BundleEntry.decode`` (tests/test_format.py checks both ways).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .block import ragged_gather
from .coding import encode_varints
from .entry import decode_shape_cached, entry_head

_ENCODE_CHUNK = 1 << 16


def encode_plain_columns(
    dtypes: Sequence[int],
    shapes: Sequence[tuple[int, ...]],
    shard_id: int,
    offsets: Sequence[int],
    sizes: Sequence[int],
    crcs: Sequence[int],
) -> tuple[bytes, np.ndarray]:
    """``encode_entry`` of many plain entries (no slices, no checksum blocks) at once: the
    entries back to back in one buffer, and their lengths.

    The varying fields (offset, size, checksum) of all entries are encoded together in
    numpy and joined to the cached heads of their dtype and shape in one gather, so no
    per-entry object is made.
    """
    n = len(offsets)
    if not n:
        return b"", np.zeros(0, np.int64)
    if n > _ENCODE_CHUNK:  # bounded temporaries (the gather's index is 8 bytes per byte)
        done = [
            encode_plain_columns(
                dtypes[i : i + _ENCODE_CHUNK],
                shapes[i : i + _ENCODE_CHUNK],
                shard_id,
                offsets[i : i + _ENCODE_CHUNK],
                sizes[i : i + _ENCODE_CHUNK],
                crcs[i : i + _ENCODE_CHUNK],
            )
            for i in range(0, n, _ENCODE_CHUNK)
        ]
        return b"".join(flat for flat, _ in done), np.concatenate([lengths for _, lengths in done])
    kinds = list(zip(dtypes, shapes, strict=True))
    distinct = {kind: i for i, kind in enumerate(dict.fromkeys(kinds))}
    heads = [entry_head(*kind, shard_id) for kind in distinct]
    head_len = np.array([len(h) for h in heads], np.int64)
    head_start = np.cumsum(head_len) - head_len
    which = np.fromiter(map(distinct.__getitem__, kinds), np.int64, n)
    tails = np.zeros((n, 27), np.uint8)  # 0x20 varint, 0x28 varint, 0x35 fixed32
    cursor = np.zeros(n, np.int64)
    offsets, sizes = np.asarray(offsets, np.uint64), np.asarray(sizes, np.uint64)
    crc_values = np.asarray(crcs, np.uint64)
    for tag, values in ((0x20, offsets), (0x28, sizes)):
        varints, lengths = encode_varints(values)
        _put_field(tails, cursor, values != 0, tag, varints, lengths)
    crc_bytes = crc_values.astype("<u4").view(np.uint8).reshape(n, 4)
    _put_field(tails, cursor, crc_values != 0, 0x35, crc_bytes, np.full(n, 4))
    tail_bytes = tails[np.arange(tails.shape[1]) < cursor[:, None]]
    src = np.concatenate([np.frombuffer(b"".join(heads), np.uint8), tail_bytes])
    tail_start = int(head_len.sum()) + np.cumsum(cursor) - cursor
    starts = np.stack([head_start[which], tail_start], axis=1).ravel()
    lengths = np.stack([head_len[which], cursor], axis=1).ravel()
    return ragged_gather(src, starts, lengths).tobytes(), head_len[which] + cursor


def split_values(flat: bytes, lengths) -> list[bytes]:
    """Back-to-back values, one bytes object each."""
    ends = np.cumsum(lengths).tolist()
    return [flat[a:b] for a, b in zip([0, *ends][:-1], ends, strict=True)]


def _put_field(
    out: np.ndarray,
    cursor: np.ndarray,
    present: np.ndarray,
    tag: int,
    values: np.ndarray,
    lengths: np.ndarray,
) -> None:
    """Append ``tag`` and the first ``lengths[i]`` bytes of ``values[i]`` to the rows
    of ``out`` where ``present``, at each row's ``cursor``, and advance the cursors."""
    rows = np.flatnonzero(present)
    out[rows, cursor[rows]] = tag
    width = values.shape[1]
    cols = cursor[rows, None] + 1 + np.arange(width)
    keep = np.arange(width) < lengths[rows, None]
    out[np.broadcast_to(rows[:, None], cols.shape)[keep], cols[keep]] = values[rows][keep]
    cursor[rows] += 1 + lengths[rows]


class PlainColumns(NamedTuple):
    """Plain entries decoded column-wise: element ``i`` of each column is entry ``i``'s
    field (meaningless where ``plain[i]`` is False: decode that one with the general decoder)."""

    plain: np.ndarray
    dtype: np.ndarray
    shape: list
    shard_id: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    crc32c: np.ndarray

    def as_lists(self) -> list[list]:
        """The columns after ``plain`` as Python lists: dtype, shape, shard, offset, size, crc."""
        return [
            self.dtype.tolist(),
            self.shape,
            self.shard_id.tolist(),
            self.offset.tolist(),
            self.size.tolist(),
            self.crc32c.tolist(),
        ]


PLAIN_MAX = 4 + 0x7F + 3 * 11 + 5
"""The longest plain entry: dtype and shape heads, a shape of at most 127 bytes, three
varint fields of at most 10 bytes and their tags, a checksum field."""


def decode_plain_columns(values: Sequence[bytes]) -> PlainColumns:
    """``BundleEntry.decode`` of many plain entries at once, column-wise in numpy.

    An index may hold tens of thousands of small tensors, each needing its entry on
    restore; decoding them one by one in Python costs more than reading their bytes.
    Anything that is not a plain entry (slices, extension fields, another field order,
    damage) is marked not ``plain``, for the general decoder to handle or reject; a
    plain entry with a damaged shape raises DecodeError, as the general decoder does.
    """
    n = len(values)
    lengths = np.fromiter(map(len, values), np.int64, n)
    if (lengths > PLAIN_MAX).any():  # full entries of sliced tensors: not joined (MBs each)
        values = [b"" if len(v) > PLAIN_MAX else v for v in values]
        lengths[lengths > PLAIN_MAX] = 0
    ends = np.cumsum(lengths)
    starts = ends - lengths
    flat = np.frombuffer(b"".join(values) + bytes(16), np.uint8)  # padding: no bound checks
    first = np.minimum(starts, len(flat) - 16)
    dtype, shape_len = flat[first + 1].astype(np.int64), flat[first + 3].astype(np.int64)
    ok = (
        (lengths >= 4)
        & (flat[first] == 0x08)
        & (dtype < 0x80)
        & (flat[first + 2] == 0x12)
        & (shape_len < 0x80)
    )
    ok &= 4 + shape_len <= lengths  # the shape lies inside the entry
    pos = np.minimum(starts + 4 + shape_len, ends)
    fields = []
    for tag in (0x18, 0x20, 0x28):
        value, pos, good = _varint_field(flat, pos, ends, tag)
        fields.append(value)
        ok &= good
    has_crc = (pos + 5 <= ends) & (flat[pos] == 0x35)
    crc_bytes = flat[(pos + 1)[:, None] + np.arange(4)].astype(np.uint32)
    crcs = np.where(
        has_crc, crc_bytes[:, 0] | crc_bytes[:, 1] << 8 | crc_bytes[:, 2] << 16 | crc_bytes[:, 3] << 24, 0
    )
    ok &= pos + 5 * has_crc == ends
    rows = np.flatnonzero(ok)
    shapes: list = [None] * n
    if len(rows) == n:
        shapes = _shapes_of(values, flat, starts + 4, shape_len, rows)
    elif len(rows):
        for i, shape in zip(
            rows.tolist(), _shapes_of(values, flat, starts[rows] + 4, shape_len[rows], rows), strict=True
        ):
            shapes[i] = shape
    return PlainColumns(ok, dtype, shapes, *fields, crcs.astype(np.uint64))


def _shapes_of(values, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> list:
    """The shapes of many entries (shape field bytes at ``starts``), decoding each
    distinct encoding once: most tensors of a model share a handful of shapes."""
    width = int(lengths.max()) + 1 if len(rows) else 1
    if width > 32:  # unusually long shapes: slice and decode one by one
        return [decode_shape_cached(values[i][4 : 4 + values[i][3]]) for i in rows.tolist()]
    table_ = np.zeros((len(rows), width), np.uint8)
    table_[:, 0] = lengths
    body = flat[np.minimum(starts[:, None] + np.arange(width - 1), len(flat) - 1)]
    body[np.arange(width - 1) >= lengths[:, None]] = 0
    table_[:, 1:] = body
    distinct, inverse = np.unique(table_.view(f"V{width}").ravel(), return_inverse=True)
    decoded = [decode_shape_cached(raw[1 : 1 + raw[0]]) for raw in map(bytes, distinct)]
    return [decoded[k] for k in inverse.ravel().tolist()]


def _varint_field(flat: np.ndarray, pos: np.ndarray, ends: np.ndarray, tag: int):
    """Decode an optional ``tag`` + varint field at every position: ``(values, new
    positions, well-formed)``; absent fields are 0 and leave the position as it is."""
    present = (pos < ends) & (flat[pos] == tag)
    values = np.zeros(len(pos), np.uint64)
    at = pos + 1
    more = present.copy()
    for k in range(10):  # byte k of every varint that is still going, at once
        if not more.any():
            break
        going = more.copy()
        byte = flat[np.minimum(at, len(flat) - 1)]
        values |= np.where(going, (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k), 0)
        at = np.where(going, at + 1, at)
        more &= byte >= 0x80
        if k == 9:
            more |= going & (byte > 1)  # past 64 bits: not a varint
    good = ~more & (at <= ends)
    return values, np.where(present, at, pos), good | ~present
