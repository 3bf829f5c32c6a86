"""The few protobuf wire-format pieces the bundle index needs, without protobuf.

Only the wire types TF's messages use: varint (0), fixed64 (1), length-delimited (2)
and fixed32 (5). Unknown fields are skipped, as protobuf parsers do.
"""

from __future__ import annotations

from collections.abc import Iterator

from .coding import DecodeError, decode_fixed32, decode_fixed64, decode_varint, encode_varint

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


def tag(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


def varint_field(field: int, value: int) -> bytes:
    return tag(field, VARINT) + encode_varint(value)


def bytes_field(field: int, data: bytes) -> bytes:
    return tag(field, LENGTH_DELIMITED) + encode_varint(len(data)) + data


def iter_fields(
    buf: bytes | memoryview, expected: dict[int, int] | None = None
) -> Iterator[tuple[int, int, object]]:
    """Yield ``(field_number, wire_type, value)``; value is an int or a bytes slice.

    ``expected`` maps field numbers to the wire type they must have; a known field with
    another wire type is damage (DecodeError), not a value of the wrong Python type.
    """
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = decode_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wire_type == VARINT:
            value, pos = decode_varint(buf, pos)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = decode_varint(buf, pos)
            if pos + length > end:
                raise DecodeError("length-delimited field runs past the message")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire_type == FIXED32:
            value = decode_fixed32(buf, pos)
            pos += 4
        elif wire_type == FIXED64:
            value = decode_fixed64(buf, pos)
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if expected is not None and expected.get(field, wire_type) != wire_type:
            raise DecodeError(f"field {field} has wire type {wire_type}, expected {expected[field]}")
        yield field, wire_type, value
