"""One BundleEntryProto: the index value of a tensor or of one piece of a sliced tensor.

This module holds the one encoder (``encode_entry``, which ``BundleEntry.encode`` is) and
the one decoder (``BundleEntry.decode``) of a single entry; columns.py holds the bulk
paths that do the same for many plain entries at once, tested byte for byte against these.

shardsave's extension fields (ignored by TensorFlow, which skips unknown fields):

    1000  crc32c_block_size  varint   size of the checksum blocks below (bytes)
    1001  block_crc32c       bytes    packed fixed32: masked CRC32C of each block of the
                                      entry's bytes, so a partial read can be verified
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from . import proto
from .coding import SMALL_VARINTS, DecodeError, decode_varint, encode_varint, to_int64

Extent = tuple[int, int]
"""(start, length) of one dimension; length -1 means the whole dimension."""

FIELD_BLOCK_SIZE = 1000
FIELD_BLOCK_CRCS = 1001

_SHAPE_WIRE = {2: proto.LENGTH_DELIMITED, 3: proto.VARINT}
_DIM_WIRE = {1: proto.VARINT, 2: proto.LENGTH_DELIMITED}
_SLICE_WIRE = {1: proto.LENGTH_DELIMITED}
_EXTENT_WIRE = {1: proto.VARINT, 2: proto.VARINT}
_ENTRY_WIRE = {
    1: proto.VARINT,
    2: proto.LENGTH_DELIMITED,
    3: proto.VARINT,
    4: proto.VARINT,
    5: proto.VARINT,
    6: proto.FIXED32,
    7: proto.LENGTH_DELIMITED,
    FIELD_BLOCK_SIZE: proto.VARINT,
    FIELD_BLOCK_CRCS: proto.LENGTH_DELIMITED,
}
_TAG_DTYPE, _TAG_SHARD = b"\x08", b"\x18"
_TAG_BLOCK_SIZE = proto.tag(FIELD_BLOCK_SIZE, proto.VARINT)
_TAG_BLOCK_CRCS = proto.tag(FIELD_BLOCK_CRCS, proto.LENGTH_DELIMITED)
_CACHE_LIMIT = 65536


def encode_shape(shape: Sequence[int]) -> bytes:
    return b"".join(proto.bytes_field(2, proto.varint_field(1, d) if d else b"") for d in shape)


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


def slice_field(extents: Sequence[Extent]) -> bytes:
    """A TensorSliceProto as field 7 (``slices``) of a full entry."""
    body = encode_slice(extents)
    return b"\x3a" + encode_varint(len(body)) + body


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
        return encode_entry(*self)

    @classmethod
    def decode(cls, data: bytes) -> BundleEntry:
        """Decode an entry; raise DecodeError on damage. Unknown fields are skipped."""
        fast = _decode_plain(data)
        return fast if fast is not None else _decode_fields(data)


def _decode_fields(data: bytes) -> BundleEntry:
    """``BundleEntry.decode`` of any entry: field by field, in any order."""
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
            shape = decode_shape_cached(bytes(value))
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
    return BundleEntry(
        dtype,
        shape,
        shard_id,
        offset,
        size,
        crc,
        LazySlices(slices) if slices else (),
        block_size,
        block_crcs,
    )


def encode_entry(
    dtype: int,
    shape: tuple[int, ...],
    shard_id: int = 0,
    offset: int = 0,
    size: int = 0,
    crc32c: int = 0,
    slices: Sequence[Sequence[Extent]] = (),
    block_size: int = 0,
    block_crcs: bytes = b"",
) -> bytes:
    """An entry's BundleEntryProto: fields in number order, zeros omitted as proto3 does.

    On the hot path of every save (an index may hold a million entries): dtype, shape and
    shard repeat across tensors, so their encoded head is cached and only offset, size
    and checksum are encoded each time.
    """
    out = entry_head(dtype, shape, shard_id)
    if offset:
        out += b"\x20" + (SMALL_VARINTS[offset] if 0 <= offset < 0x80 else encode_varint(offset))
    if size:
        out += b"\x28" + (SMALL_VARINTS[size] if 0 <= size < 0x80 else encode_varint(size))
    if crc32c:
        out += b"\x35" + crc32c.to_bytes(4, "little")
    if slices:
        out += b"".join([slice_field(sl) for sl in slices])
    if block_size:
        out += (
            _TAG_BLOCK_SIZE
            + encode_varint(block_size)
            + _TAG_BLOCK_CRCS
            + encode_varint(len(block_crcs))
            + block_crcs
        )
    return out


_entry_heads: dict[tuple[int, tuple[int, ...], int], bytes] = {}
_shape_fields: dict[tuple[int, ...], bytes] = {}
_shapes: dict[bytes, tuple[int, ...]] = {}


def entry_head(dtype: int, shape: tuple[int, ...], shard_id: int) -> bytes:
    """Fields 1-3 of an entry (dtype, shape, shard), cached: they repeat across tensors."""
    head = _entry_heads.get((dtype, shape, shard_id))
    if head is None:
        head = _shape_field(shape)
        if dtype:
            head = _TAG_DTYPE + encode_varint(dtype) + head
        if shard_id:
            head += _TAG_SHARD + encode_varint(shard_id)
        if len(_entry_heads) < _CACHE_LIMIT:
            _entry_heads[(dtype, shape, shard_id)] = head
    return head


def _shape_field(shape: tuple[int, ...]) -> bytes:
    """Field 2 (the TensorShapeProto) of an entry; shapes repeat, so they are cached."""
    out = _shape_fields.get(shape)
    if out is None:
        out = proto.bytes_field(2, encode_shape(shape))
        if len(_shape_fields) < _CACHE_LIMIT:
            _shape_fields[shape] = out
    return out


def decode_shape_cached(data: bytes) -> tuple[int, ...]:
    """``decode_shape``, remembering each distinct encoding: most tensors share a few shapes."""
    shape = _shapes.get(data)
    if shape is None:
        shape = decode_shape(data)
        if len(_shapes) < _CACHE_LIMIT:
            _shapes[data] = shape
    return shape


def _decode_plain(data: bytes) -> BundleEntry | None:
    """``BundleEntry.decode``'s fast path for the common entry: fields 1-6 in order, as TF
    and shardsave write them (every piece of a sliced tensor is one, and there may be a
    million). Returns None for anything else (slices, extension fields, other orders,
    damage), which the general loop then decodes or rejects.
    """
    end = len(data)
    if end < 2 or data[0] != 0x08 or data[1] > 0x7F:
        return None
    dtype = data[1]
    if end < 4 or data[2] != 0x12 or data[3] > 0x7F or 4 + data[3] > end:
        return None
    pos = 4 + data[3]
    shape = decode_shape_cached(data[4:pos])
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


def new_entry(fields: tuple) -> BundleEntry:
    """A BundleEntry from a tuple of all its fields (skips the per-call keyword handling)."""
    return tuple.__new__(BundleEntry, fields)


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
