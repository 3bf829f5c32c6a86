"""One block of a LevelDB table, as TensorFlow's ``core/lib/io/block_builder.cc`` writes it.

A block is a run of prefix-compressed entries ``varint32 shared, varint32 unshared,
varint32 value_len, key_suffix, value`` followed by fixed32 restart offsets and a fixed32
count; in the file it is followed by a 5-byte trailer, a compression type (0) and the
masked CRC32C of the block plus that type byte. Building works column-wise in numpy (an
index holds one entry per tensor or piece, up to millions); reading checks the trailer.
"""

from __future__ import annotations

import struct

import numpy as np

from . import crc
from .coding import DecodeError, decode_fixed32, decode_varint, encode_varint, encode_varints

RESTART_INTERVAL = 16
TRAILER_SIZE = 5
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1


class BlockBuilder:
    """A block entry by entry, for the index and metaindex blocks and as the tests'
    reference; data blocks are built column-wise (``gather_entries``)."""

    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            shared = _common_prefix(self.last_key, key)
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        unshared, vlen = len(key) - shared, len(value)
        buf = self.buf
        if shared < 0x80 and unshared < 0x80 and vlen < 0x80:
            buf += bytes((shared, unshared, vlen))
        else:
            buf += encode_varint(shared) + encode_varint(unshared) + encode_varint(vlen)
        buf += key[shared:]
        buf += value
        self.last_key = key
        self.counter += 1

    def finish(self) -> bytes:
        return finish_block(self.buf, self.restarts)


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix, with C-speed big-integer XOR instead of a byte loop."""
    n = min(len(a), len(b))
    diff = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n if not diff else n - 1 - (diff.bit_length() - 1) // 8


def shared_with_previous(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Length of the common prefix of each key with the one before it (0 for the first),
    compared 16 bytes at a time for the keys whose prefixes are still equal."""
    n = len(starts)
    shared = np.zeros(n, np.int64)
    if n < 2:
        return shared
    limit = np.minimum(lengths[1:], lengths[:-1])
    rows = np.arange(1, n)
    offset = 0
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([flat, np.zeros(16, np.uint8)]), 16)
    while len(rows):
        cols = offset + np.arange(16)
        a = windows[np.minimum(starts[rows] + offset, len(flat))]
        b = windows[np.minimum(starts[rows - 1] + offset, len(flat))]
        differ = (a != b) | (cols >= limit[rows - 1, None])
        found = differ.any(axis=1)
        shared[rows[found]] = offset + np.argmax(differ[found], axis=1)
        rows = rows[~found]
        offset += 16
    return shared


def varint_len(values: np.ndarray) -> np.ndarray:
    """Bytes in the varint of each (non-negative, below 2**35) value."""
    return 1 + (values >= 1 << 7) + (values >= 1 << 14) + (values >= 1 << 21) + (values >= 1 << 28)


def gather_entries(shared, unshared, vlen, key_bytes, key_from, value_bytes, value_from) -> np.ndarray:
    """The bytes of a block's entries: varint shared, varint unshared, varint value
    length, key suffix, value; assembled with one gather from all the pieces."""
    n = len(shared)
    header_src, header_len = [], []
    for column in (shared, unshared, vlen):
        varints, lengths = encode_varints(column)
        header_src.append(varints.ravel())
        header_len.append(lengths)
    src = np.concatenate([*header_src, key_bytes, value_bytes])
    base = np.cumsum([0, *(len(x) for x in header_src), len(key_bytes)])
    rows = np.arange(n)
    starts = np.stack(
        [base[i] + rows * (len(header_src[i]) // max(n, 1)) for i in range(3)]
        + [base[3] + key_from, base[4] + value_from],
        axis=1,
    ).ravel()
    lengths = np.stack([*header_len, unshared, vlen], axis=1).ravel()
    return ragged_gather(src, starts, lengths)


def ragged_gather(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([src[s:s+l] for s, l in zip(starts, lengths)])`` without the loop."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return src[np.arange(total) + np.repeat(starts - out_starts, lengths)]


def finish_block(buf, restarts: list[int]) -> bytes:
    """A block's entries followed by its restart offsets and their count."""
    return bytes(buf) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def block_contents(data: memoryview, offset: int, size: int, what: str) -> memoryview:
    end = offset + size
    if end + TRAILER_SIZE > len(data) or size < 4:
        raise DecodeError(f"{what} at offset {offset} (size {size}) runs past the end of the file")
    contents = data[offset:end]
    ctype = data[end]
    stored = decode_fixed32(data, end + 1)
    actual = crc.mask(crc.crc32c(data[end : end + 1], crc.crc32c(contents)))
    if stored != actual:
        raise DecodeError(
            f"{what} at offset {offset}: checksum does not match: "
            f"stored {stored:#010x} vs. calculated {actual:#010x}"
        )
    if ctype == SNAPPY_COMPRESSION:
        raise DecodeError(f"{what} at offset {offset} is Snappy-compressed, which is not supported")
    if ctype != NO_COMPRESSION:
        raise DecodeError(f"{what} at offset {offset} has unknown compression type {ctype}")
    return contents


def block_entries(contents: memoryview, what: str) -> list[tuple[bytes, bytes]]:
    num_restarts = decode_fixed32(contents, len(contents) - 4)
    limit = len(contents) - 4 - 4 * num_restarts
    if num_restarts == 0 or limit < 0:
        raise DecodeError(f"{what}: bad restart count {num_restarts}")
    block = bytes(contents[:limit])  # bytes slicing is cheaper than memoryview's
    restarts = np.frombuffer(contents, "<u4", num_restarts, limit).astype(np.int64)
    fast = _entries_by_restart(block, restarts)
    if fast is not None:
        return fast
    entries = []
    append = entries.append
    key = b""
    pos = 0
    while pos < limit:
        head = block[pos : pos + 3]  # one-byte varints inline
        if len(head) == 3 and head[0] < 0x80 and head[1] < 0x80 and head[2] < 0x80:
            shared, unshared, vlen = head
            pos += 3
        else:
            shared, pos = decode_varint(block, pos, limit)
            unshared, pos = decode_varint(block, pos, limit)
            vlen, pos = decode_varint(block, pos, limit)
        end = pos + unshared
        if shared > len(key) or end + vlen > limit:
            raise DecodeError(f"{what}: corrupt entry at block offset {pos}")
        key = key[:shared] + block[pos:end]
        append((key, block[end : end + vlen]))
        pos = end + vlen
    return entries


def _entries_by_restart(block: bytes, restarts: np.ndarray) -> list[tuple[bytes, bytes]] | None:
    """The entries of a block whose entry headers are all one-byte varints, found for all
    restart runs at once (numpy steps through the k-th entry of every run together), so
    only the keys are assembled one by one. None when the block does not fit that shape
    (long keys or values, damage): the sequential parser then decodes or rejects it."""
    limit = len(block)
    if (
        not len(restarts)
        or restarts[0] != 0
        or np.any(np.diff(restarts) <= 0)
        or restarts[-1] >= max(limit, 1)
    ):
        return None
    data = np.frombuffer(block + bytes(3), np.uint8)
    run_end = np.append(restarts[1:], limit)
    pos = restarts.copy()
    runs, found = np.arange(len(restarts)), []
    active = pos < run_end
    for step in range(256):
        if not active.any():
            break
        which = runs[active]
        at = pos[which]
        head = data[at[:, None] + np.arange(3)].astype(np.int64)
        if head.max(initial=0) >= 0x80:
            return None
        found.append((which, np.full(len(which), step), at, head))
        pos[which] = at + 3 + head[:, 1] + head[:, 2]
        active = pos < run_end
    else:
        return None
    if not np.array_equal(pos, run_end):
        return None
    if not found:
        return []
    which, steps, at, head = (np.concatenate(x) for x in zip(*found, strict=True))
    order = np.lexsort((steps, which))
    at, head = at[order], head[order]
    suffix = at + 3
    value = suffix + head[:, 1]
    end = value + head[:, 2]
    entries = []
    append = entries.append
    key = b""
    for shared, a, b, c in zip(
        head[:, 0].tolist(), suffix.tolist(), value.tolist(), end.tolist(), strict=True
    ):
        if shared > len(key):
            return None
        key = key[:shared] + block[a:b]
        append((key, block[b:c]))
    return entries
