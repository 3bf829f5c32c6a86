"""The bundle index: BundleHeaderProto and BundleEntryProto, and the sorted table of them.

Key ``b""`` holds the header; every other key is a tensor name (UTF-8) holding an entry,
or an OrderedCode slice key (ordered_code.py) holding one piece of a sliced tensor.

shardsave's extension fields (ignored by TensorFlow, which skips unknown fields):

    1000  crc32c_block_size  varint   size of the checksum blocks below (bytes)
    1001  block_crc32c       bytes    packed fixed32: masked CRC32C of each block of the
                                      entry's bytes, so a partial read can be verified
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import proto, table
from .coding import SMALL_VARINTS, DecodeError, decode_varint, encode_varint, encode_varints, to_int64
from .ordered_code import decode_slice_key, encode_slice_key, write_string

Extent = tuple[int, int]
"""(start, length) of one dimension; length -1 means the whole dimension."""

TENSOR_BUNDLE_VERSION = 1
LITTLE_ENDIAN, BIG_ENDIAN = 0, 1
FIELD_BLOCK_SIZE = 1000
FIELD_BLOCK_CRCS = 1001


V, L = proto.VARINT, proto.LENGTH_DELIMITED
_HEADER_WIRE = {1: V, 2: V, 3: L}
_VERSION_WIRE = {1: V, 2: V, 3: V}
_SHAPE_WIRE = {2: L, 3: V}
_DIM_WIRE = {1: V, 2: L}
_SLICE_WIRE = {1: L}
_EXTENT_WIRE = {1: V, 2: V}


@dataclass(frozen=True)
class BundleHeader:
    num_shards: int = 1
    endianness: int = LITTLE_ENDIAN
    producer: int = TENSOR_BUNDLE_VERSION
    min_consumer: int = 0

    def encode(self) -> bytes:
        out = b""
        if self.num_shards:
            out += proto.varint_field(1, self.num_shards)
        if self.endianness:
            out += proto.varint_field(2, self.endianness)
        version = b""
        if self.producer:
            version += proto.varint_field(1, self.producer)
        if self.min_consumer:
            version += proto.varint_field(2, self.min_consumer)
        return out + proto.bytes_field(3, version)

    @classmethod
    def decode(cls, data: bytes) -> BundleHeader:
        values = {"num_shards": 0, "endianness": 0, "producer": 0, "min_consumer": 0}
        for num, _, value in proto.iter_fields(data, _HEADER_WIRE):
            if num == 1:
                values["num_shards"] = value
            elif num == 2:
                values["endianness"] = value
            elif num == 3:
                for vnum, _, vvalue in proto.iter_fields(value, _VERSION_WIRE):
                    if vnum == 1:
                        values["producer"] = vvalue
                    elif vnum == 2:
                        values["min_consumer"] = vvalue
        return cls(**values)


def encode_shape(shape: Sequence[int]) -> bytes:
    dims = b"".join(proto.bytes_field(2, proto.varint_field(1, d) if d else b"") for d in shape)
    return dims


def decode_shape(data: bytes) -> tuple[int, ...]:
    dims = []
    for num, _, value in proto.iter_fields(data, _SHAPE_WIRE):
        if num == 2:
            size = 0
            for dnum, _, dvalue in proto.iter_fields(value, _DIM_WIRE):
                if dnum == 1:
                    size = to_int64(dvalue)
            dims.append(size)
        elif num == 3 and value:
            raise DecodeError("shape of unknown rank")
    return tuple(dims)


def encode_slice(extents: Sequence[Extent]) -> bytes:
    out = []
    for start, length in extents:
        if length == -1:
            out.append(b"\x0a\x00")
            continue
        ext = (b"\x08" + encode_varint(start) if start else b"") + b"\x10" + encode_varint(length)
        out.append(b"\x0a" + encode_varint(len(ext)) + ext)
    return b"".join(out)


def decode_slice(data: bytes) -> tuple[Extent, ...]:
    extents = []
    for num, _, value in proto.iter_fields(data, _SLICE_WIRE):
        if num == 1:
            start, length = 0, -1
            for enum, _, evalue in proto.iter_fields(value, _EXTENT_WIRE):
                if enum == 1:
                    start = to_int64(evalue)
                elif enum == 2:
                    length = to_int64(evalue)
            extents.append((start, length))
    return tuple(extents)


class BundleEntry(NamedTuple):
    """One tensor (or one piece of a sliced tensor) in the index."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: tuple[tuple[Extent, ...], ...] = ()
    block_size: int = 0
    block_crcs: bytes = b""
    """Packed little-endian masked CRC32C of each ``block_size`` run of the entry's bytes."""

    def encode(self) -> bytes:
        # Hand-unrolled (fields in number order, zeros omitted as proto3 does): an index
        # may hold a million entries, so this is on the hot path of every save.
        out = [_TAG_DTYPE, encode_varint(self.dtype)] if self.dtype else []
        out.append(_shape_field(self.shape))
        if self.shard_id:
            out += (_TAG_SHARD, encode_varint(self.shard_id))
        if self.offset:
            out += (_TAG_OFFSET, encode_varint(self.offset))
        if self.size:
            out += (_TAG_SIZE, encode_varint(self.size))
        if self.crc32c:
            out += (_TAG_CRC, self.crc32c.to_bytes(4, "little"))
        for sl in self.slices:
            body = encode_slice(sl)
            out += (b"\x3a", encode_varint(len(body)), body)
        if self.block_size:
            out += (_TAG_BLOCK_SIZE, encode_varint(self.block_size))
            out += (_TAG_BLOCK_CRCS, encode_varint(len(self.block_crcs)), self.block_crcs)
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> BundleEntry:
        fast = _decode_plain(data)
        if fast is not None:
            return fast
        dtype = shard_id = offset = size = crc = block_size = 0
        shape: tuple[int, ...] = ()
        slices = []
        block_crcs = b""
        pos, end = 0, len(data)
        while pos < end:
            key = data[pos]  # one-byte varints inline: this loop runs for every entry
            pos += 1
            if key > 0x7F:
                key, pos = decode_varint(data, pos - 1)
            field_number, wire = key >> 3, key & 7
            if wire == proto.VARINT:
                if pos >= end:
                    raise DecodeError("truncated varint")
                value = data[pos]
                pos += 1
                if value > 0x7F:
                    value, pos = decode_varint(data, pos - 1)
            elif wire == proto.LENGTH_DELIMITED:
                length, pos = decode_varint(data, pos)
                if pos + length > end:
                    raise DecodeError("length-delimited field runs past the entry")
                value = data[pos : pos + length]
                pos += length
            elif wire == proto.FIXED32:
                if pos + 4 > end:
                    raise DecodeError("truncated fixed32 field")
                value = int.from_bytes(data[pos : pos + 4], "little")
                pos += 4
            elif wire == proto.FIXED64:
                if pos + 8 > end:
                    raise DecodeError("truncated fixed64 field")
                value = int.from_bytes(data[pos : pos + 8], "little")
                pos += 8
            else:
                raise DecodeError(f"unsupported wire type {wire}")
            expected = _ENTRY_WIRE.get(field_number)
            if expected is not None and wire != expected:
                raise DecodeError(f"entry field {field_number} has wire type {wire}, expected {expected}")
            if field_number == 1:
                dtype = value
            elif field_number == 2:
                shape = _decode_shape_cached(bytes(value))
            elif field_number == 3:
                shard_id = value
            elif field_number == 4:
                offset = value
            elif field_number == 5:
                size = value
            elif field_number == 6:
                crc = value
            elif field_number == 7:
                slices.append(bytes(value))
            elif field_number == FIELD_BLOCK_SIZE:
                block_size = value
            elif field_number == FIELD_BLOCK_CRCS:
                block_crcs = bytes(value)
        return cls(dtype, shape, shard_id, offset, size, crc, LazySlices(slices) if slices else (),
                   block_size, block_crcs)


_entry_heads: dict[tuple[int, tuple[int, ...], int], bytes] = {}


def encode_plain_entry(dtype: int, shape: tuple[int, ...], shard_id: int, offset: int, size: int,
                       crc32c: int, block_size: int = 0, block_crcs: bytes = b"") -> bytes:
    """``BundleEntry(...).encode()`` for an entry without slices, several times faster.

    A save encodes one entry per tensor; dtype, shape and shard repeat across tensors, so
    their encoded head is cached and only offset, size and checksum are encoded each time.
    """
    out = _entry_head(dtype, shape, shard_id)
    if offset:
        out += b"\x20" + (SMALL_VARINTS[offset] if offset < 0x80 else encode_varint(offset))
    if size:
        out += b"\x28" + (SMALL_VARINTS[size] if size < 0x80 else encode_varint(size))
    if crc32c:
        out += b"\x35" + crc32c.to_bytes(4, "little")
    if block_size:
        out += (_TAG_BLOCK_SIZE + encode_varint(block_size) + _TAG_BLOCK_CRCS
                + encode_varint(len(block_crcs)) + block_crcs)
    return out


_ENCODE_CHUNK = 1 << 16


def encode_plain_columns(
    dtypes: Sequence[int], shapes: Sequence[tuple[int, ...]], shard_id: int,
    offsets: Sequence[int], sizes: Sequence[int], crcs: Sequence[int],
) -> tuple[bytes, np.ndarray]:
    """``encode_plain_entry`` (without checksum blocks) of many entries at once: the
    entries back to back in one buffer, and their lengths.

    The varying fields (offset, size, checksum) of all entries are encoded together in
    numpy and joined to the cached heads of their dtype and shape in one gather, so no
    per-entry object is made.
    """
    n = len(offsets)
    if not n:
        return b"", np.zeros(0, np.int64)
    if n > _ENCODE_CHUNK:  # bounded temporaries (the gather's index is 8 bytes per byte)
        done = [encode_plain_columns(dtypes[i : i + _ENCODE_CHUNK], shapes[i : i + _ENCODE_CHUNK], shard_id,
                                     offsets[i : i + _ENCODE_CHUNK], sizes[i : i + _ENCODE_CHUNK],
                                     crcs[i : i + _ENCODE_CHUNK]) for i in range(0, n, _ENCODE_CHUNK)]
        return b"".join(flat for flat, _ in done), np.concatenate([lengths for _, lengths in done])
    kinds = list(zip(dtypes, shapes, strict=True))
    distinct = {kind: i for i, kind in enumerate(dict.fromkeys(kinds))}
    heads = [_entry_head(*kind, shard_id) for kind in distinct]
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
    return table.ragged_gather(src, starts, lengths).tobytes(), head_len[which] + cursor


def encode_plain_entries(
    dtypes: Sequence[int], shapes: Sequence[tuple[int, ...]], shard_id: int,
    offsets: Sequence[int], sizes: Sequence[int], crcs: Sequence[int],
) -> list[bytes]:
    """``encode_plain_columns``, one bytes object per entry."""
    flat, lengths = encode_plain_columns(dtypes, shapes, shard_id, offsets, sizes, crcs)
    return split_values(flat, lengths)


def split_values(flat: bytes, lengths) -> list[bytes]:
    """Back-to-back values, one bytes object each."""
    ends = np.cumsum(lengths).tolist()
    return [flat[a:b] for a, b in zip([0, *ends][:-1], ends, strict=True)]


def _put_field(out: np.ndarray, cursor: np.ndarray, present: np.ndarray, tag: int,
               values: np.ndarray, lengths: np.ndarray) -> None:
    """Append ``tag`` and the first ``lengths[i]`` bytes of ``values[i]`` to the rows
    of ``out`` where ``present``, at each row's ``cursor``, and advance the cursors."""
    rows = np.flatnonzero(present)
    out[rows, cursor[rows]] = tag
    width = values.shape[1]
    cols = cursor[rows, None] + 1 + np.arange(width)
    keep = np.arange(width) < lengths[rows, None]
    out[np.broadcast_to(rows[:, None], cols.shape)[keep], cols[keep]] = values[rows][keep]
    cursor[rows] += 1 + lengths[rows]


def _entry_head(dtype: int, shape: tuple[int, ...], shard_id: int) -> bytes:
    """Fields 1-3 of an entry (dtype, shape, shard), cached: they repeat across tensors."""
    head = _entry_heads.get((dtype, shape, shard_id))
    if head is None:
        head = BundleEntry(dtype, shape, shard_id).encode()
        if len(_entry_heads) < 65536:
            _entry_heads[(dtype, shape, shard_id)] = head
    return head


def _decode_plain(data: bytes) -> BundleEntry | None:
    """The common entry, fast: fields 1-6 in order, as TF and shardsave write them.

    Returns None for anything else (slices, extension fields, other orders, damage),
    which the general decoder then handles or rejects.
    """
    end = len(data)
    if end < 2 or data[0] != 0x08 or data[1] > 0x7F:
        return None
    dtype = data[1]
    if end < 4 or data[2] != 0x12 or data[3] > 0x7F or 4 + data[3] > end:
        return None
    pos = 4 + data[3]
    shape = _decode_shape_cached(data[4:pos])
    shard_id = offset = size = crc = 0
    try:
        if pos < end and data[pos] == 0x18:
            shard_id, pos = decode_varint(data, pos + 1)
        if pos < end and data[pos] == 0x20:
            offset, pos = decode_varint(data, pos + 1)
        if pos < end and data[pos] == 0x28:
            size, pos = decode_varint(data, pos + 1)
    except DecodeError:
        return None
    if pos + 5 <= end and data[pos] == 0x35:
        crc = int.from_bytes(data[pos + 1 : pos + 5], "little")
        pos += 5
    if pos != end:
        return None
    return BundleEntry(dtype, shape, shard_id, offset, size, crc)


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
        return [self.dtype.tolist(), self.shape, self.shard_id.tolist(), self.offset.tolist(),
                self.size.tolist(), self.crc32c.tolist()]


def decode_plain_columns(values: Sequence[bytes]) -> PlainColumns:
    """``_decode_plain`` of many entries at once, column-wise in numpy.

    An index may hold tens of thousands of small tensors, each needing its entry on
    restore; decoding them one by one in Python costs more than reading their bytes.
    Anything that is not a plain entry (slices, extension fields, another field order,
    damage) is marked not ``plain``, for the general decoder to handle or reject; a
    plain entry with a damaged shape raises DecodeError, as the general decoder does.
    """
    n = len(values)
    lengths = np.fromiter(map(len, values), np.int64, n)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    flat = np.frombuffer(b"".join(values) + bytes(16), np.uint8)  # padding: no bound checks
    first = np.minimum(starts, len(flat) - 16)
    dtype, shape_len = flat[first + 1].astype(np.int64), flat[first + 3].astype(np.int64)
    ok = (lengths >= 4) & (flat[first] == 0x08) & (dtype < 0x80) & (flat[first + 2] == 0x12) & (shape_len < 0x80)
    ok &= 4 + shape_len <= lengths  # the shape lies inside the entry
    pos = np.minimum(starts + 4 + shape_len, ends)
    fields = []
    for tag in (0x18, 0x20, 0x28):
        value, pos, good = _varint_field(flat, pos, ends, tag)
        fields.append(value)
        ok &= good
    has_crc = (pos + 5 <= ends) & (flat[pos] == 0x35)
    crc_bytes = flat[(pos + 1)[:, None] + np.arange(4)].astype(np.uint32)
    crcs = np.where(has_crc, crc_bytes[:, 0] | crc_bytes[:, 1] << 8 | crc_bytes[:, 2] << 16 | crc_bytes[:, 3] << 24, 0)
    ok &= pos + 5 * has_crc == ends
    rows = np.flatnonzero(ok)
    shapes: list = [None] * n
    if len(rows) == n:
        shapes = _shapes_of(values, flat, starts + 4, shape_len, rows)
    elif len(rows):
        for i, shape in zip(rows.tolist(), _shapes_of(values, flat, starts[rows] + 4, shape_len[rows], rows),
                            strict=True):
            shapes[i] = shape
    return PlainColumns(ok, dtype, shapes, *fields, crcs.astype(np.uint64))


def decode_plain_entries(values: Sequence[bytes]) -> list[BundleEntry | None]:
    """The entries ``decode_plain_columns`` decodes, as BundleEntry (None: not plain)."""
    c = decode_plain_columns(values)
    return [_new_entry((*fields, (), 0, b"")) if plain else None
            for plain, *fields in zip(c.plain.tolist(), *c.as_lists(), strict=True)]


def _new_entry(fields: tuple) -> BundleEntry:
    """A BundleEntry from a tuple of all its fields (skips the per-call keyword handling)."""
    return tuple.__new__(BundleEntry, fields)


def _shapes_of(values, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> list:
    """The shapes of many entries (shape field bytes at ``starts``), decoding each
    distinct encoding once: most tensors of a model share a handful of shapes."""
    width = int(lengths.max()) + 1 if len(rows) else 1
    if width > 32:  # unusually long shapes: slice and decode one by one
        return [_decode_shape_cached(values[i][4 : 4 + values[i][3]]) for i in rows.tolist()]
    table_ = np.zeros((len(rows), width), np.uint8)
    table_[:, 0] = lengths
    body = flat[np.minimum(starts[:, None] + np.arange(width - 1), len(flat) - 1)]
    body[np.arange(width - 1) >= lengths[:, None]] = 0
    table_[:, 1:] = body
    distinct, inverse = np.unique(table_.view(f"V{width}").ravel(), return_inverse=True)
    decoded = [_decode_shape_cached(raw[1 : 1 + raw[0]]) for raw in map(bytes, distinct)]
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


_ENTRY_WIRE = {1: proto.VARINT, 2: proto.LENGTH_DELIMITED, 3: proto.VARINT, 4: proto.VARINT,
               5: proto.VARINT, 6: proto.FIXED32, 7: proto.LENGTH_DELIMITED,
               FIELD_BLOCK_SIZE: proto.VARINT, FIELD_BLOCK_CRCS: proto.LENGTH_DELIMITED}
_TAG_DTYPE, _TAG_SHARD, _TAG_OFFSET, _TAG_SIZE = b"\x08", b"\x18", b"\x20", b"\x28"
_TAG_CRC = b"\x35"
_TAG_BLOCK_SIZE = proto.tag(FIELD_BLOCK_SIZE, proto.VARINT)
_TAG_BLOCK_CRCS = proto.tag(FIELD_BLOCK_CRCS, proto.LENGTH_DELIMITED)
_shape_fields: dict[tuple[int, ...], bytes] = {}
_shapes: dict[bytes, tuple[int, ...]] = {}


def _shape_field(shape: tuple[int, ...]) -> bytes:
    """Field 2 (the TensorShapeProto) of an entry; shapes repeat, so they are cached."""
    out = _shape_fields.get(shape)
    if out is None:
        out = proto.bytes_field(2, encode_shape(shape))
        if len(_shape_fields) < 65536:
            _shape_fields[shape] = out
    return out


def _decode_shape_cached(data: bytes) -> tuple[int, ...]:
    shape = _shapes.get(data)
    if shape is None:
        shape = decode_shape(data)
        if len(_shapes) < 65536:
            _shapes[data] = shape
    return shape


class LazySlices(tuple):
    """The ``slices`` of a full entry, decoded on first use.

    A sliced tensor saved by many ranks lists one slice per piece; an index may hold a
    million of them, and most readers only need the pieces' own keys, so decoding waits.
    """

    def __new__(cls, raw: list[bytes]):
        self = super().__new__(cls)
        self._raw = raw
        self._decoded = None
        return self

    def _value(self) -> tuple:
        if self._decoded is None:
            self._decoded = tuple(decode_slice(r) for r in self._raw)
        return self._decoded

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self):
        return iter(self._value())

    def __getitem__(self, i):
        return self._value()[i]

    def __eq__(self, other) -> bool:
        return self._value() == tuple(other) if isinstance(other, tuple) else NotImplemented

    def __ne__(self, other) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = tuple.__hash__

    def __bool__(self) -> bool:
        return bool(self._raw)

    def __repr__(self) -> str:
        return repr(self._value())


class Pieces(Mapping[str, dict[tuple[Extent, ...], BundleEntry]]):
    """For each sliced tensor, its pieces' entries by extents, decoded per tensor on use.

    The slice keys of one tensor are contiguous in the sorted index (they all start with
    the tensor's encoded name), so only the table blocks that hold them are parsed.
    """

    def __init__(self, reader: table.TableReader, counts: dict[str, int]):
        self._reader = reader
        self._counts = counts  # name -> number of slices its full entry lists
        self._cache: dict[str, dict[tuple[Extent, ...], BundleEntry]] = {}

    def __getitem__(self, name: str) -> dict[tuple[Extent, ...], BundleEntry]:
        found = self._cache.get(name)
        if found is not None:
            return found
        if name not in self._counts:
            raise KeyError(name)
        prefix = b"\x00" + write_string(name.encode("utf-8"))
        out: dict[tuple[Extent, ...], BundleEntry] = {}
        for key, value in self._reader.range(prefix, prefix + b"\xff"):
            try:
                key_name, extents = decode_slice_key(key)
            except ValueError as exc:
                raise DecodeError(f"bad slice key {key!r}: {exc}") from exc
            if key_name == name:
                entry = out[tuple(extents)] = BundleEntry.decode(value)
                problem = entry_problem(entry)
                if problem:
                    raise DecodeError(f"a piece of tensor {name!r}: {problem}")
        if len(out) != self._counts[name]:
            raise DecodeError(
                f"tensor {name!r}: its entry lists {self._counts[name]} slices, the index holds {len(out)}"
            )
        self._cache[name] = out
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._counts

    def __iter__(self):
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())


class Entries(Mapping[str, BundleEntry]):
    """An index's plain and full entries by tensor name (a read-only mapping).

    Plain entries stay in the columns they were decoded into and become BundleEntry
    objects only when asked for one by one, so a restore of many small tensors can work
    on the columns (``row``, ``names``, ``columns``) without making an object per tensor.
    """

    def __init__(self, names: list[str], columns: PlainColumns, others: dict[str, BundleEntry]):
        self.names = names
        self.row = {name: i for i, name in enumerate(names)}
        self.columns = columns
        self._made = others  # the entries made so far, and those that are not plain
        self._lists: list | None = None

    def __getitem__(self, name: str) -> BundleEntry:
        entry = self._made.get(name)
        if entry is None:
            i = self.row[name]
            if self._lists is None:
                self._lists = self.columns.as_lists()
            entry = self._made[name] = _new_entry((*(col[i] for col in self._lists), (), 0, b""))
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self.row

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Index:
    """A parsed index: the header, the full entries by name, and the slice entries."""

    header: BundleHeader
    entries: Entries
    """Plain entries and the full entries of sliced tensors, by tensor name."""
    pieces: Mapping[str, dict[tuple[Extent, ...], BundleEntry]]
    """For each sliced tensor, its pieces' entries by extents (decoded on use)."""


def build_index(
    header: BundleHeader,
    entries: Iterable[tuple[bytes, BundleEntry]],
) -> bytes:
    """Serialize an index; ``entries`` are ``(key, entry)`` in any order."""
    items = sorted((key, entry.encode()) for key, entry in entries)
    return table.build_table([(b"", header.encode())] + items)


class RankIndexPart(NamedTuple):
    """What one rank sends the coordinator: its entries and slice protos, encoded.

    Encoding happens on every rank in parallel, so the coordinator's merge is a sort and
    a concatenation, whatever the number of ranks.
    """

    keys: list[bytes]
    """The key of every entry this rank wrote."""
    values: bytes
    """Their encoded BundleEntryProtos, back to back."""
    lengths: np.ndarray
    """The length of each."""
    slices: list[tuple[str, tuple[Extent, ...], bytes]]
    """``(name, extents, field)`` of every piece of a sliced tensor, where ``field`` is the
    TensorSliceProto encoded as field 7 (``slices``) of the tensor's full entry."""


def encode_rank_part(keys: list[bytes], values: bytes, lengths, sliced_names) -> RankIndexPart:
    """A rank's entries (keys, and their encodings back to back with their lengths), with
    the slice protos of the pieces of tensors in ``sliced_names``."""
    slices = []
    for key in keys:
        if key[:1] == b"\x00":
            name, extents = decode_slice_key(key)
            if name in sliced_names:  # as field 7 of the full entry, ready to concatenate
                body = encode_slice(extents)
                slices.append((name, tuple(extents), b"\x3a" + encode_varint(len(body)) + body))
    return RankIndexPart(list(keys), values, np.asarray(lengths, np.int64), slices)


def merge_index(num_shards: int, parts: Sequence[RankIndexPart], sliced: Mapping[str, tuple[int, tuple[int, ...]]]) -> bytes:
    """The coordinator's merge: every rank's entries plus one full entry per sliced
    tensor (``sliced``: name -> (dtype, global shape)), listing its slices in order."""
    header = BundleHeader(num_shards=num_shards).encode()
    keys = [b"", *(key for part in parts for key in part.keys)]
    chunks = [header, *(part.values for part in parts)]
    lengths = [np.array([len(header)], np.int64), *(part.lengths for part in parts)]
    groups: dict[str, list[tuple[tuple[Extent, ...], bytes]]] = {name: [] for name in sliced}
    for part in parts:
        for name, extents, proto_bytes in part.slices:
            groups[name].append((extents, proto_bytes))
    full = []
    for name, (dtype, shape) in sliced.items():
        fields = [field for _, field in sorted(groups[name])]
        full.append(BundleEntry(dtype, tuple(shape)).encode() + b"".join(fields))
        keys.append(entry_key(name))
    chunks += full
    lengths.append(np.fromiter(map(len, full), np.int64, len(full)))
    values, value_len = b"".join(chunks), np.concatenate(lengths)
    if not all(map(operator.lt, keys, keys[1:])):  # ranks' entries interleave: sort them
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        pieces = split_values(values, value_len)
        values = b"".join([pieces[i] for i in order])
        value_len = value_len[order]
    return table.build_table_columns(keys, values, value_len)


def entry_key(name: str, extents: Sequence[Extent] | None = None) -> bytes:
    """The index key of a plain tensor (``extents`` None) or of one piece of a sliced one."""
    if extents is None:
        return name.encode("utf-8")
    return encode_slice_key(name, extents)


def parse_index(data: bytes | memoryview) -> Index:
    """Parse an index file; raise DecodeError on damage.

    Every block's checksum is checked and the plain and full entries are decoded now; the
    pieces of a sliced tensor when first used (``Index.pieces[name]``, which may also
    raise DecodeError), so opening an index of a million slices stays cheap.
    """
    reader = table.TableReader(data)
    head = reader.block(0)[:2] if len(reader) else []
    if not head or head[0][0] != b"":
        raise DecodeError("index has no header entry")
    header = BundleHeader.decode(head[0][1])
    if header.endianness != LITTLE_ENDIAN:
        raise DecodeError("big-endian checkpoints are not supported")
    if header.min_consumer > TENSOR_BUNDLE_VERSION:
        raise DecodeError(f"checkpoint needs a reader of version {header.min_consumer}")
    items = reader.range(b"\x01")  # slice keys start with 0x00: names follow them
    values = [value for _, value in items]
    names = _decode_names([key for key, _ in items])
    columns = decode_plain_columns(values)
    others: dict[str, BundleEntry] = {}
    counts: dict[str, int] = {}
    for i in np.flatnonzero(~columns.plain).tolist():  # not plain: the general decoder
        entry = others[names[i]] = BundleEntry.decode(values[i])
        if entry.slices:
            counts[names[i]] = len(entry.slices)
    _check_ranges(names, columns, others)
    entries = Entries(names, columns, others)
    if len(entries.row) != len(names):
        raise DecodeError("index holds the same tensor name twice")
    if not counts and len(head) > 1 and head[1][0][:1] == b"\x00":
        _explain_slice_mismatch([k for k, _ in reader.range(b"\x00", b"\x01")], counts)
    return Index(header, entries, Pieces(reader, counts))


FIELD_LIMIT = 1 << 62
"""Shard ids, offsets, sizes and block sizes at or past this are damage (no file holds
4 EiB), rejected when the index is parsed, so that sums of two of them fit in an int64."""


def entry_problem(entry: BundleEntry) -> str | None:
    """What makes an entry's integer fields unusable, whatever its tensor (None: nothing)."""
    if entry.shard_id < FIELD_LIMIT and entry.offset < FIELD_LIMIT and entry.size < FIELD_LIMIT \
            and entry.block_size < FIELD_LIMIT:
        return None
    return (f"shard_id {entry.shard_id}, offset {entry.offset}, size {entry.size} or crc32c_block_size "
            f"{entry.block_size} is out of range (2**62 or more)")


def _check_ranges(names: list[str], columns: PlainColumns, others: dict[str, BundleEntry]) -> None:
    """``entry_problem`` of every plain and full entry: the plain ones column-wise."""
    limit = np.uint64(FIELD_LIMIT)
    bad = columns.plain & ((columns.shard_id >= limit) | (columns.offset >= limit) | (columns.size >= limit))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DecodeError(f"tensor {names[i]!r}: shard_id {int(columns.shard_id[i])}, offset "
                          f"{int(columns.offset[i])} or size {int(columns.size[i])} is out of range (2**62 or more)")
    for name, entry in others.items():
        problem = entry_problem(entry)
        if problem:
            raise DecodeError(f"tensor {name!r}: {problem}")


def _decode_names(keys: list[bytes]) -> list[str]:
    """The keys as tensor names, decoded in one call, joined by a byte no name holds, when
    there is one. A name that is not UTF-8 is damage: no writer can produce one (TF's and
    shardsave's names are Python strings), and no caller could print it."""
    joined = b"\x00".join(keys)
    try:
        if joined.count(b"\x00") == len(keys) - 1 and keys:
            return joined.decode("utf-8").split("\x00")
        return [key.decode("utf-8") for key in keys]
    except UnicodeDecodeError:
        bad = next(key for key in keys if not _is_utf8(key))
        raise DecodeError(f"tensor name {bad!r} is not UTF-8") from None


def _is_utf8(key: bytes) -> bool:
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _explain_slice_mismatch(slice_keys: list[bytes], counts: dict[str, int]) -> None:
    """Raise a DecodeError that says which slice entries do not match the full entries."""
    found: dict[str, int] = {}
    for key in slice_keys:
        try:
            name, _ = decode_slice_key(key)
        except ValueError as exc:
            raise DecodeError(f"bad slice key {key!r}: {exc}") from exc
        if name not in counts:
            raise DecodeError(f"slices of {name!r} have no full entry")
        found[name] = found.get(name, 0) + 1
    for name, count in counts.items():
        if found.get(name, 0) != count:
            raise DecodeError(f"tensor {name!r}: its entry lists {count} slices, the index holds {found.get(name, 0)}")


__all__ = [
    "BundleEntry",
    "Entries",
    "BundleHeader",
    "Extent",
    "Index",
    "RankIndexPart",
    "build_index",
    "encode_rank_part",
    "entry_key",
    "merge_index",
    "parse_index",
]
