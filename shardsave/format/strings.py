"""DT_STRING tensors in data files.

Layout of one entry: every element's length as a varint64, then a fixed32 masked
CRC32C of the lengths, then every element's bytes. The entry checksum starts over the
lengths, each taken as a 4-byte little-endian integer (not the varint bytes), continues
over the 4 checksum bytes and then over the string bytes (TF: tensor_bundle.cc WriteStringTensor).
"""

from __future__ import annotations

import numpy as np

from . import crc
from .coding import DecodeError, decode_varint, encode_varint

STRING_DTYPE = np.dtype(object)


def as_bytes_list(array: np.ndarray) -> list[bytes]:
    """The elements of a string array as bytes (str is encoded as UTF-8)."""
    out = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, bytes | bytearray | np.bytes_):
            raise TypeError(f"string tensor element {item!r} is not bytes or str")
        out.append(bytes(item))
    return out


def encode_strings(array: np.ndarray) -> tuple[bytes, int]:
    """Return ``(data, masked_crc32c)`` for a string tensor."""
    elems = as_bytes_list(array)
    lengths = b"".join(encode_varint(len(e)) for e in elems)
    value = 0
    for e in elems:
        value = crc.crc32c(len(e).to_bytes(4, "little"), value)
    length_crc = crc.mask(value).to_bytes(4, "little")
    value = crc.crc32c(length_crc, value)
    body = b"".join(elems)
    value = crc.crc32c(body, value)
    return lengths + length_crc + body, crc.mask(value)


def decode_strings(data: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Return ``(array of bytes objects, masked crc computed)``; DecodeError on damage."""
    count = int(np.prod(shape, dtype=np.int64))
    pos = 0
    lengths = []
    value = 0
    for _ in range(count):
        n, pos = decode_varint(data, pos)
        lengths.append(n)
        value = crc.crc32c((n & 0xFFFFFFFF).to_bytes(4, "little"), value)
    if pos + 4 > len(data):
        raise DecodeError("string tensor truncated before its length checksum")
    stored_length_crc = int.from_bytes(data[pos : pos + 4], "little")
    if stored_length_crc != crc.mask(value):
        raise DecodeError(
            f"string lengths checksum does not match: stored {stored_length_crc:#010x} "
            f"vs. calculated {crc.mask(value):#010x}"
        )
    value = crc.crc32c(data[pos : pos + 4], value)
    pos += 4
    if pos + sum(lengths) != len(data):
        raise DecodeError(f"string tensor holds {len(data) - pos} bytes of text, lengths say {sum(lengths)}")
    value = crc.crc32c(data[pos:], value)
    out = np.empty(count, dtype=STRING_DTYPE)
    for i, n in enumerate(lengths):
        out[i] = bytes(data[pos : pos + n])
        pos += n
    return out.reshape(shape), crc.mask(value)
