"""Varints and fixed-width little-endian integers, as in LevelDB's util/coding.h."""

from __future__ import annotations

import struct

_FIXED32 = struct.Struct("<I")
_FIXED64 = struct.Struct("<Q")


class DecodeError(ValueError):
    """Bytes that do not decode; callers turn it into a DataLossError naming the file."""


_ONE_BYTE = [bytes((i,)) for i in range(128)]


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128; negative int64 values are encoded as their two's complement."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, limit: int | None = None) -> tuple[int, int]:
    """Return ``(value, new_pos)``; raise DecodeError on a truncated or overlong varint."""
    end = len(buf) if limit is None else limit
    if pos < end and buf[pos] < 0x80:  # the common one-byte case
        return buf[pos], pos + 1
    result = 0
    shift = 0
    stop = min(end, pos + 10)
    while pos < stop:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    if pos >= end:
        raise DecodeError("truncated varint")
    raise DecodeError("varint longer than 10 bytes")


def encode_fixed32(value: int) -> bytes:
    return _FIXED32.pack(value)


def decode_fixed32(buf: bytes | memoryview, pos: int) -> int:
    if pos + 4 > len(buf):
        raise DecodeError("truncated fixed32")
    return _FIXED32.unpack_from(buf, pos)[0]


def encode_fixed64(value: int) -> bytes:
    return _FIXED64.pack(value)


def decode_fixed64(buf: bytes | memoryview, pos: int) -> int:
    if pos + 8 > len(buf):
        raise DecodeError("truncated fixed64")
    return _FIXED64.unpack_from(buf, pos)[0]


def to_int64(value: int) -> int:
    """Reinterpret a decoded unsigned varint as a signed int64."""
    return value - (1 << 64) if value >= 1 << 63 else value
