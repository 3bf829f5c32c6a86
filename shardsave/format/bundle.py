"""The bundle index: BundleHeaderProto and BundleEntryProto, and the sorted table of them.

Key ``b""`` holds the header; every other key is a tensor name (UTF-8) holding an entry,
or an OrderedCode slice key (ordered_code.py) holding one piece of a sliced tensor.

shardsave's extension fields (ignored by TensorFlow, which skips unknown fields):

    1000  crc32c_block_size  varint   size of the checksum blocks below (bytes)
    1001  block_crc32c       bytes    packed fixed32: masked CRC32C of each block of the
                                      entry's bytes, so a partial read can be verified
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from . import proto, table
from .coding import DecodeError, decode_varint, encode_varint, to_int64
from .ordered_code import decode_slice_key, encode_slice_key

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
    out = b""
    for start, length in extents:
        ext = b""
        if length != -1:
            if start:
                ext += proto.varint_field(1, start)
            ext += proto.varint_field(2, length)
        out += proto.bytes_field(1, ext)
    return out


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
            out.append(proto.bytes_field(7, encode_slice(sl)))
        if self.block_size:
            out += (_TAG_BLOCK_SIZE, encode_varint(self.block_size))
            out += (_TAG_BLOCK_CRCS, encode_varint(len(self.block_crcs)), self.block_crcs)
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> BundleEntry:
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
                slices.append(decode_slice(value))
            elif field_number == FIELD_BLOCK_SIZE:
                block_size = value
            elif field_number == FIELD_BLOCK_CRCS:
                block_crcs = bytes(value)
        return cls(dtype, shape, shard_id, offset, size, crc, tuple(slices), block_size, block_crcs)


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


@dataclass(frozen=True)
class Index:
    """A parsed index: the header, the full entries by name, and the slice entries."""

    header: BundleHeader
    entries: dict[str, BundleEntry]
    """Plain entries and the full entries of sliced tensors, by tensor name."""
    pieces: dict[str, dict[tuple[Extent, ...], BundleEntry]]
    """For each sliced tensor, its pieces' entries by extents."""


def build_index(
    header: BundleHeader,
    entries: Iterable[tuple[bytes, BundleEntry]],
) -> bytes:
    """Serialize an index; ``entries`` are ``(key, entry)`` in any order."""
    items = sorted((key, entry.encode()) for key, entry in entries)
    return table.build_table([(b"", header.encode())] + items)


def entry_key(name: str, extents: Sequence[Extent] | None = None) -> bytes:
    """The index key of a plain tensor (``extents`` None) or of one piece of a sliced one."""
    if extents is None:
        return name.encode("utf-8")
    return encode_slice_key(name, extents)


def parse_index(data: bytes | memoryview) -> Index:
    """Parse a whole index file; raise DecodeError on damage."""
    pairs = table.read_table(data)
    if not pairs or pairs[0][0] != b"":
        raise DecodeError("index has no header entry")
    header = BundleHeader.decode(pairs[0][1])
    if header.endianness != LITTLE_ENDIAN:
        raise DecodeError("big-endian checkpoints are not supported")
    if header.min_consumer > TENSOR_BUNDLE_VERSION:
        raise DecodeError(f"checkpoint needs a reader of version {header.min_consumer}")
    entries: dict[str, BundleEntry] = {}
    pieces: dict[str, dict[tuple[Extent, ...], BundleEntry]] = {}
    for key, value in pairs[1:]:
        entry = BundleEntry.decode(value)
        if key[:1] == b"\x00":
            try:
                name, extents = decode_slice_key(key)
            except ValueError as exc:
                raise DecodeError(f"bad slice key {key!r}: {exc}") from exc
            pieces.setdefault(name, {})[tuple(extents)] = entry
        else:
            entries[key.decode("utf-8", errors="surrogateescape")] = entry
    for name in pieces:
        if name not in entries:
            raise DecodeError(f"slices of {name!r} have no full entry")
    return Index(header, entries, pieces)


def encode_block_crcs(crcs: Iterable[int]) -> bytes:
    return b"".join(c.to_bytes(4, "little") for c in crcs)


__all__ = [
    "BundleEntry",
    "BundleHeader",
    "Extent",
    "Index",
    "build_index",
    "entry_key",
    "parse_index",
]
