"""TensorFlow's "OrderedCode", as used for sliced-tensor keys in a bundle index.

A port of the parts of ``tensorflow/core/lib/strings/ordered_code.cc`` that
``checkpoint::EncodeTensorNameSlice`` / ``DecodeTensorNameSlice``
(``tensorflow/core/util/saved_tensor_slice_util.cc``) use.  Encodings sort
bytewise in the same order as the values they encode.

* Unsigned number: one length byte, then the value big-endian without leading
  zero bytes (0 is ``00``, 258 is ``02 01 02``).
* Signed number (int64): sign bit (1 for ``v >= 0``), then as many further
  copies of the sign bit as there are extra bytes, a delimiter bit of the
  opposite value, then the value in two's complement, big-endian.  One byte
  holds ``-64 <= v < 64`` as ``0x80 ^ v``; n bytes hold ``[-2**(7n-1), 2**(7n-1))``;
  the longest form is 10 bytes.
* String: bytes ``00`` -> ``00 ff`` and ``ff`` -> ``ff 00``, terminated by ``00 01``.
* Slice key: ``num(0) string(name) num(rank)`` then ``signed(start) signed(length)``
  per dimension; a dimension taken whole is written as start 0, length -1.

Readers raise ValueError on truncated, over-long or non-minimal encodings (TF checks
the last only in debug builds); TF never writes such bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "decode_slice_key",
    "encode_slice_key",
    "read_num_increasing",
    "read_signed_num_increasing",
    "read_string",
    "write_num_increasing",
    "write_signed_num_increasing",
    "write_string",
]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_INT32_MAX = (1 << 31) - 1

_SPECIAL = re.compile(rb"[\x00\xff]")
_ESCAPES = {b"\x00": b"\x00\xff", b"\xff": b"\xff\x00"}

# Header bits XOR-ed into the first two bytes, by encoding length (kLengthToHeaderBits).
_HEADER = (
    (0x00, 0x00), (0x80, 0x00), (0xC0, 0x00), (0xE0, 0x00), (0xF0, 0x00), (0xF8, 0x00),
    (0xFC, 0x00), (0xFE, 0x00), (0xFF, 0x00), (0xFF, 0x80), (0xFF, 0xC0),
)  # fmt: skip


def _signed_length(v: int) -> int:
    """Encoding length of ``v`` (kBitsToLength): n bytes carry 7n - 1 value bits."""
    bits = (~v if v < 0 else v).bit_length()
    return min(bits // 7 + 1, 10)


def write_num_increasing(n: int) -> bytes:
    """Encode an unsigned 64-bit integer (OrderedCode::WriteNumIncreasing)."""
    if not 0 <= n <= _UINT64_MAX:
        raise ValueError(f"unsigned number out of uint64 range: {n}")
    length = (n.bit_length() + 7) // 8
    return bytes([length]) + n.to_bytes(length, "big")


def read_num_increasing(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode an unsigned number at ``buf[pos:]``; return (value, new position)."""
    if pos >= len(buf):
        raise ValueError(f"truncated unsigned number at offset {pos}")
    length = buf[pos]
    if length > 8:
        raise ValueError(f"unsigned number at offset {pos} claims {length} bytes (max 8)")
    end = pos + 1 + length
    if end > len(buf):
        raise ValueError(f"truncated unsigned number at offset {pos}")
    if length and buf[pos + 1] == 0:
        raise ValueError(f"non-minimal unsigned number at offset {pos}")
    return int.from_bytes(buf[pos + 1 : end], "big"), end


def write_signed_num_increasing(v: int) -> bytes:
    """Encode a signed 64-bit integer (OrderedCode::WriteSignedNumIncreasing)."""
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"signed number out of int64 range: {v}")
    length = _signed_length(v)
    out = bytearray((v % (1 << (8 * length))).to_bytes(length, "big"))
    out[0] ^= _HEADER[length][0]
    if length > 1:
        out[1] ^= _HEADER[length][1]
    return bytes(out)


def read_signed_num_increasing(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a signed number at ``buf[pos:]``; return (value, new position)."""
    if pos >= len(buf):
        raise ValueError(f"truncated signed number at offset {pos}")
    flip = 0x00 if buf[pos] & 0x80 else 0xFF  # negative numbers have inverted header bits
    # The header is a run of bits equal to the sign bit (the sign bit plus one per
    # extra byte) closed by a delimiter bit; it may spill into the second byte.
    head = (buf[pos] ^ flip) << 8
    if pos + 1 < len(buf):
        head |= buf[pos + 1] ^ flip
    length = 16 - (~head & 0xFFFF).bit_length()  # leading one bits of the 16-bit window
    if length > 10:
        raise ValueError(f"signed number at offset {pos} is longer than 10 bytes")
    end = pos + length
    if end > len(buf):
        raise ValueError(f"truncated signed number at offset {pos}")
    raw = bytearray(buf[pos:end])
    raw[0] ^= _HEADER[length][0]
    if length > 1:
        raw[1] ^= _HEADER[length][1]
    value = int.from_bytes(raw, "big", signed=False)
    if flip:
        value -= 1 << (8 * length)  # header removed: what is left is two's complement
    if not _INT64_MIN <= value <= _INT64_MAX or _signed_length(value) != length:
        raise ValueError(f"non-minimal or out-of-range signed number at offset {pos}")
    return value, end


def write_string(s: bytes) -> bytes:
    """Encode a byte string (OrderedCode::WriteString)."""
    return _SPECIAL.sub(lambda m: _ESCAPES[m.group()], bytes(s)) + b"\x00\x01"


def read_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Decode a string at ``buf[pos:]``; return (value, new position)."""
    out = bytearray()
    i = pos
    n = len(buf)
    while True:
        j = i
        while j < n and buf[j] not in (0x00, 0xFF):
            j += 1
        out += buf[i:j]
        if j + 1 >= n:
            raise ValueError(f"unterminated string starting at offset {pos}")
        pair = buf[j : j + 2]
        if pair == b"\x00\x01":
            return bytes(out), j + 2
        if pair == b"\x00\xff":
            out.append(0x00)
        elif pair == b"\xff\x00":
            out.append(0xFF)
        else:
            raise ValueError(f"invalid escape {pair.hex()} at offset {j} in string")
        i = j + 2


def _check_extent(d: int, start: int, length: int) -> None:
    if (start, length) == (0, -1):
        return
    if start < 0 or length < 0 or start > _INT64_MAX or length > _INT64_MAX:
        raise ValueError(
            f"bad extent {(start, length)} in dimension {d}: need start >= 0 and "
            "length >= 0, or (0, -1) for a dimension taken whole"
        )


def encode_slice_key(name: str, extents: Sequence[tuple[int, int]]) -> bytes:
    """Index key of one slice of tensor ``name`` (checkpoint::EncodeTensorNameSlice).

    ``extents`` holds one ``(start, length)`` per dimension; ``(0, -1)`` means the
    whole dimension.
    """
    if not 0 < len(extents) < _INT32_MAX:
        raise ValueError(f"slice rank must be positive, got {len(extents)}")
    parts = [write_num_increasing(0), write_string(name.encode("utf-8"))]
    parts.append(write_num_increasing(len(extents)))
    for d, (start, length) in enumerate(extents):
        _check_extent(d, start, length)
        parts.append(write_signed_num_increasing(start))
        parts.append(write_signed_num_increasing(length))
    return b"".join(parts)


def decode_slice_key(key: bytes) -> tuple[str, list[tuple[int, int]]]:
    """Inverse of :func:`encode_slice_key` (checkpoint::DecodeTensorNameSlice).

    Raises ValueError if ``key`` is not a well-formed slice key.
    """
    try:
        lead, pos = read_num_increasing(key, 0)
        if lead != 0:
            raise ValueError(f"leading number is {lead}, expected 0")
        raw_name, pos = read_string(key, pos)
        rank, pos = read_num_increasing(key, pos)
        if not 0 < rank < _INT32_MAX:
            raise ValueError(f"rank must be positive and below 2**31-1, got {rank}")
        extents: list[tuple[int, int]] = []
        for d in range(rank):
            start, pos = read_signed_num_increasing(key, pos)
            length, pos = read_signed_num_increasing(key, pos)
            _check_extent(d, start, length)
            extents.append((start, length))
        if pos != len(key):
            raise ValueError(f"{len(key) - pos} trailing bytes")
        name = raw_name.decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed tensor slice key {bytes(key)!r}: {e}") from None
    return name, extents
