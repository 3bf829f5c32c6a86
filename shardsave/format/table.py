"""LevelDB-style sorted table, as TensorFlow's ``core/lib/io/table_builder.cc`` writes it.

Layout (docs/FORMAT.md, "The index file")::

    [data block][trailer] ... [metaindex block][trailer] [index block][trailer] [footer]

A block is a run of prefix-compressed entries ``varint32 shared, varint32 unshared,
varint32 value_len, key_suffix, value`` followed by fixed32 restart offsets and a fixed32
count. The 5-byte trailer is a compression type (0) and the masked CRC32C of the block
plus that type byte. The 48-byte footer holds the metaindex and index block handles,
zero padding to 40 bytes and the magic number. The builder mirrors TF's choices
(256 KiB blocks, restarts every 16 entries, 1 in the index block, shortest separators)
so that the files come out byte-identical to TF's; the reader accepts any valid table.
"""

from __future__ import annotations

import bisect
import operator
import struct
from collections.abc import Iterable

import numpy as np

from . import crc
from .coding import DecodeError, decode_fixed32, decode_varint, encode_fixed32, encode_varint, encode_varints

BLOCK_SIZE = 256 * 1024
RESTART_INTERVAL = 16
TRAILER_SIZE = 5
FOOTER_SIZE = 48
MAGIC = 0xDB4775248B80FB57
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1


class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def empty(self) -> bool:
        return not self.buf

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

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
        return _finish_block(self.buf, self.restarts)


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix, with C-speed big-integer XOR instead of a byte loop."""
    n = min(len(a), len(b))
    diff = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n if not diff else n - 1 - (diff.bit_length() - 1) // 8


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """LevelDB's BytewiseComparator::FindShortestSeparator."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n:
        byte = start[i]
        if byte < 0xFF and byte + 1 < limit[i]:
            return start[:i] + bytes((byte + 1,))
    return start


def _short_successor(key: bytes) -> bytes:
    """LevelDB's BytewiseComparator::FindShortSuccessor."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes((byte + 1,))
    return key


def _handle(offset: int, size: int) -> bytes:
    return encode_varint(offset) + encode_varint(size)


def build_table(items: Iterable[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE) -> bytes:
    """Serialize ``(key, value)`` pairs, which must come in strictly increasing key order.

    Column-wise: prefix lengths, entry headers and block boundaries are computed for all
    entries at once in numpy and each block's bytes gathered in one step, because an index
    holds one entry per tensor (or per piece), up to millions of them.
    """
    pairs = items if isinstance(items, list) else list(items)
    values = [v for _, v in pairs]
    return build_table_columns([k for k, _ in pairs], b"".join(values),
                               np.fromiter(map(len, values), np.int64, len(values)), block_size)


def build_table_columns(keys: list[bytes], values: bytes, value_len: np.ndarray, block_size: int = BLOCK_SIZE) -> bytes:
    """``build_table`` with the values given back to back in one buffer, with their lengths."""
    n = len(keys)
    if n > 1 and not all(map(operator.lt, keys, keys[1:])):
        i = next(i for i in range(1, n) if not keys[i - 1] < keys[i])
        raise ValueError(f"table keys out of order: {keys[i - 1]!r} then {keys[i]!r}")
    value_len = np.asarray(value_len, np.int64)
    if len(value_len) != n or int(value_len.sum()) != len(values):
        raise ValueError(f"{n} keys, {len(value_len)} value lengths summing to {int(value_len.sum())}, "
                         f"{len(values)} value bytes")
    key_len = np.fromiter(map(len, keys), np.int64, n)
    key_bytes = np.frombuffer(b"".join(keys), np.uint8)
    value_bytes = np.frombuffer(values, np.uint8)
    key_start = np.cumsum(key_len) - key_len
    value_start = np.cumsum(value_len) - value_len
    shared_prev = _shared_with_previous(key_bytes, key_start, key_len)

    out = bytearray()
    index_block = _BlockBuilder(1)

    def write_block(contents: bytes) -> bytes:
        offset = len(out)
        out.extend(contents)
        out.append(NO_COMPRESSION)
        out.extend(encode_fixed32(crc.mask(crc.crc32c(b"\x00", crc.crc32c(contents)))))
        return _handle(offset, len(contents))

    # entries per block, guessed from the average entry (a wrong guess only costs a retry)
    average = (int(key_len.sum()) + int(value_len.sum())) / max(n, 1) + 3
    first, guess = 0, int(block_size / average * 1.25) + 16
    while first < n:
        # the entries of the next block: up to and including the one that fills it
        while True:
            stop = min(n, first + guess)
            j = np.arange(stop - first)
            shared = np.where(j % RESTART_INTERVAL == 0, 0, shared_prev[first:stop])
            unshared = key_len[first:stop] - shared
            vlen = value_len[first:stop]
            size = _varint_len(shared) + _varint_len(unshared) + _varint_len(vlen) + unshared + vlen
            estimate = np.cumsum(size) + 4 * (j // RESTART_INTERVAL + 1) + 4
            full = np.flatnonzero(estimate >= block_size)
            if len(full) or stop == n:
                break
            guess *= 2
        count = int(full[0]) + 1 if len(full) else stop - first
        shared, unshared, vlen, size = shared[:count], unshared[:count], vlen[:count], size[:count]
        # only this block's stretch of the key and value bytes (each block is a slice)
        k0, v0 = key_start[first], value_start[first]
        k1 = key_start[first + count - 1] + key_len[first + count - 1]
        v1 = value_start[first + count - 1] + value_len[first + count - 1]
        block = _gather_entries(
            shared, unshared, vlen,
            key_bytes[k0:k1], key_start[first : first + count] + shared - k0,
            value_bytes[v0:v1], value_start[first : first + count] - v0,
        )
        restarts = (np.cumsum(size) - size)[::RESTART_INTERVAL]
        handle = write_block(_finish_block(block, restarts.tolist()))
        last = first + count - 1
        separator = _shortest_separator(keys[last], keys[last + 1]) if last + 1 < n else _short_successor(keys[last])
        index_block.add(separator, handle)
        first += count

    metaindex_handle = write_block(_BlockBuilder(RESTART_INTERVAL).finish())
    index_handle = write_block(index_block.finish())
    footer = metaindex_handle + index_handle
    footer += bytes(40 - len(footer))
    footer += encode_fixed32(MAGIC & 0xFFFFFFFF) + encode_fixed32(MAGIC >> 32)
    out.extend(footer)
    return bytes(out)


def _shared_with_previous(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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


def _varint_len(values: np.ndarray) -> np.ndarray:
    """Bytes in the varint of each (non-negative, below 2**35) value."""
    return 1 + (values >= 1 << 7) + (values >= 1 << 14) + (values >= 1 << 21) + (values >= 1 << 28)


def _gather_entries(shared, unshared, vlen, key_bytes, key_from, value_bytes, value_from) -> np.ndarray:
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
    starts = np.stack([base[i] + rows * (len(header_src[i]) // max(n, 1)) for i in range(3)]
                      + [base[3] + key_from, base[4] + value_from], axis=1).ravel()
    lengths = np.stack([*header_len, unshared, vlen], axis=1).ravel()
    return ragged_gather(src, starts, lengths)


def ragged_gather(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([src[s:s+l] for s, l in zip(starts, lengths)])`` without the loop."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return src[np.arange(total) + np.repeat(starts - out_starts, lengths)]


def _finish_block(buf, restarts: list[int]) -> bytes:
    """A block's entries followed by its restart offsets and their count."""
    return bytes(buf) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def _read_handle(buf, pos: int) -> tuple[int, int, int]:
    offset, pos = decode_varint(buf, pos)
    size, pos = decode_varint(buf, pos)
    return offset, size, pos


def _block_contents(data: memoryview, offset: int, size: int, what: str) -> memoryview:
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


def _block_entries(contents: memoryview, what: str) -> list[tuple[bytes, bytes]]:
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
    if not len(restarts) or restarts[0] != 0 or np.any(np.diff(restarts) <= 0) or restarts[-1] >= max(limit, 1):
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
    for shared, a, b, c in zip(head[:, 0].tolist(), suffix.tolist(), value.tolist(), end.tolist(), strict=True):
        if shared > len(key):
            return None
        key = key[:shared] + block[a:b]
        append((key, block[b:c]))
    return entries


_key = operator.itemgetter(0)


class TableReader:
    """Reads a table block by block, as LevelDB does: the index block maps separator keys
    to data blocks, so a key range is found by binary search and only the blocks that
    may hold it are parsed. Every block's checksum is verified when the table is opened.
    """

    def __init__(self, data: bytes | memoryview):
        data = memoryview(data)
        if len(data) < FOOTER_SIZE:
            raise DecodeError(f"file is {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte footer")
        footer = data[len(data) - FOOTER_SIZE :]
        magic = decode_fixed32(footer, 40) | (decode_fixed32(footer, 44) << 32)
        if magic != MAGIC:
            raise DecodeError(f"bad magic number {magic:#018x} (not a checkpoint index)")
        _, _, pos = _read_handle(footer, 0)
        index_offset, index_size, _ = _read_handle(footer, pos)
        index = _block_contents(data, index_offset, index_size, "index block")
        self._separators: list[bytes] = []
        self._blocks: list[memoryview] = []
        self._offsets: list[int] = []
        for separator, handle in _block_entries(index, "index block"):
            offset, size, _ = _read_handle(handle, 0)
            self._separators.append(separator)
            self._blocks.append(_block_contents(data, offset, size, "data block"))
            self._offsets.append(offset)
        self._parsed: dict[int, list[tuple[bytes, bytes]]] = {}

    def __len__(self) -> int:
        """Number of data blocks."""
        return len(self._blocks)

    def block(self, i: int) -> list[tuple[bytes, bytes]]:
        entries = self._parsed.get(i)
        if entries is None:
            entries = _block_entries(self._blocks[i], f"data block at offset {self._offsets[i]}")
            keys = [key for key, _ in entries]
            if (entries and i and keys[0] <= self._separators[i - 1]) or not all(
                map(operator.lt, keys, keys[1:])
            ):
                raise DecodeError(f"data block at offset {self._offsets[i]}: keys out of order")
            self._parsed[i] = entries
        return entries

    def range(self, lo: bytes, hi: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """The entries with ``lo <= key < hi`` (``hi`` None: to the end), in key order."""
        out: list[tuple[bytes, bytes]] = []
        # block i holds keys in (separator[i-1], separator[i]], in order (checked by block())
        i = bisect.bisect_left(self._separators, lo)
        first = _key
        while i < len(self._blocks) and (hi is None or i == 0 or self._separators[i - 1] < hi):
            entries = self.block(i)
            start = bisect.bisect_left(entries, lo, key=first)
            stop = len(entries) if hi is None else bisect.bisect_left(entries, hi, key=first)
            out += entries[start:stop]
            i += 1
        return out

    def items(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for i in range(len(self._blocks)):
            out.extend(self.block(i))
        return out


def read_table(data: bytes | memoryview) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` pairs of a table, checking every block's checksum."""
    return TableReader(data).items()
