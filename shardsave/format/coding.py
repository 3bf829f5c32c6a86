"""Varints and fixed-width little-endian integers, as in LevelDB's util/coding.h."""

from __future__ import annotations

import struct

import numpy as np

_FIXED32 = struct.Struct("<I")
_FIXED64 = struct.Struct("<Q")


class DecodeError(ValueError):
    """Bytes that do not decode; callers turn it into a DataLossError naming the file."""


SMALL_VARINTS = [bytes((i,)) for i in range(128)]
"""The encodings of 0..127 (one byte each), for hot loops that inline the common case."""


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128; negative int64 values are encoded as their two's complement."""
    if 0 <= value < 0x80:
        return SMALL_VARINTS[value]
    if value < 0:
        value += 1 << 64
    if value < 0x4000:  # offsets and sizes of small tensors: two and three bytes, unrolled
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
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


def decode_fixed64(buf: bytes | memoryview, pos: int) -> int:
    if pos + 8 > len(buf):
        raise DecodeError("truncated fixed64")
    return _FIXED64.unpack_from(buf, pos)[0]


def to_int64(value: int) -> int:
    """Reinterpret a decoded unsigned varint as a signed int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def encode_varints(values) -> tuple[np.ndarray, np.ndarray]:
    """Varints of many unsigned values at once: ``(bytes, lengths)``, where row ``i`` of
    the ``(n, w)`` uint8 matrix ``bytes`` holds the ``lengths[i]`` bytes of value ``i``
    (``w`` is the longest length, at most 10)."""
    v = np.asarray(values, dtype=np.uint64)
    lengths = np.ones(len(v), np.int64)
    for k in range(1, 10):
        longer = v >= np.uint64(1 << (7 * k))
        if not longer.any():
            break
        lengths += longer
    width = int(lengths.max(initial=1))
    shifts = np.arange(0, 7 * width, 7, dtype=np.uint64)
    groups = ((v[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    groups[np.arange(width) < (lengths[:, None] - 1)] |= 0x80
    return groups, lengths
