"""LevelDB-style sorted table, as TensorFlow's ``core/lib/io/table_builder.cc`` writes it.

Layout (docs/FORMAT.md, "The index file")::

    [data block][trailer] ... [metaindex block][trailer] [index block][trailer] [footer]

Each block and its 5-byte trailer are block.py's. The 48-byte footer holds the metaindex and index block handles,
zero padding to 40 bytes and the magic number. The builder mirrors TF's choices
(256 KiB blocks, restarts every 16 entries, 1 in the index block, shortest separators)
so that the files come out byte-identical to TF's; the reader accepts any valid table.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from . import crc
from .block import (
    NO_COMPRESSION,
    RESTART_INTERVAL,
    BlockBuilder,
    BlockSeeker,
    block_contents,
    block_entries,
    finish_block,
    gather_entries,
    gather_records,
    gather_rows,
    ragged_gather,
    rows_fit,
    shared_with_previous,
    short_width,
    varint_len,
)
from .coding import DecodeError, decode_fixed32, decode_varint, encode_fixed32, encode_varint

BLOCK_SIZE = 256 * 1024
FOOTER_SIZE = 48
MAGIC = 0xDB4775248B80FB57


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
    return build_table_columns(
        [k for k, _ in pairs],
        b"".join(values),
        np.fromiter(map(len, values), np.int64, len(values)),
        block_size,
    )


def build_table_columns(
    keys: list[bytes], values: bytes, value_len: np.ndarray, block_size: int = BLOCK_SIZE
) -> bytes:
    """``build_table`` with the values given back to back in one buffer, with their lengths."""
    n = len(keys)
    if n > 1 and not all(map(operator.lt, keys, keys[1:])):
        i = next(i for i in range(1, n) if not keys[i - 1] < keys[i])
        raise ValueError(f"table keys out of order: {keys[i - 1]!r} then {keys[i]!r}")
    value_len = np.asarray(value_len, np.int64)
    if len(value_len) != n or int(value_len.sum()) != len(values):
        raise ValueError(
            f"{n} keys, {len(value_len)} value lengths summing to {int(value_len.sum())}, "
            f"{len(values)} value bytes"
        )
    key_len = np.fromiter(map(len, keys), np.int64, n)
    value_start = np.cumsum(value_len) - value_len
    return bytes(
        build_table_flat(
            Column(np.frombuffer(b"".join(keys), np.uint8), np.cumsum(key_len) - key_len, key_len),
            Column(np.frombuffer(values, np.uint8), value_start, value_len),
            block_size,
        )
    )


class Column(NamedTuple):
    """Byte strings column-wise: string ``i`` is ``flat[start[i] : start[i] + length[i]]``
    (in any place in ``flat``, in any order)."""

    flat: np.ndarray
    start: np.ndarray
    length: np.ndarray


def build_table_flat(
    keys: Column, values: Column, block_size: int = BLOCK_SIZE, *, shared: np.ndarray | None = None
) -> bytearray:
    """``build_table`` of keys and values held column-wise: no Python object per entry.
    The table is returned as the bytearray it was built in: a copy into ``bytes`` would
    double the memory of a large index (560 MB at ten million entries) at its peak.

    The keys must be strictly increasing (the caller sorted them: keysort.sort_keys, which
    also gives ``shared``, each key's common prefix with the one before);
    each block's key and value bytes are gathered from the flat buffers when it is built,
    so the entries need not lie in order in them (a merge sorts starts, not bytes)."""
    n = len(keys.start)
    key_flat, key_start, key_len = (
        keys.flat,
        np.asarray(keys.start, np.int64),
        np.asarray(keys.length, np.int64),
    )
    val_flat, val_start, value_len = (
        values.flat,
        np.asarray(values.start, np.int64),
        np.asarray(values.length, np.int64),
    )
    shared_prev = shared_with_previous(key_flat, key_start, key_len) if shared is None else shared
    records = key_flat is val_flat  # keys and values may lie back to back (merge.py's records)

    out = bytearray()
    index_block = BlockBuilder(1)

    def key_at(i: int) -> bytes:
        return key_flat[key_start[i] : key_start[i] + key_len[i]].tobytes()

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
            size = varint_len(shared) + varint_len(unshared) + varint_len(vlen) + unshared + vlen
            estimate = np.cumsum(size) + 4 * (j // RESTART_INTERVAL + 1) + 4
            full = np.flatnonzero(estimate >= block_size)
            if len(full) or stop == n:
                break
            guess *= 2
        count = int(full[0]) + 1 if len(full) else stop - first
        shared, unshared, vlen, size = shared[:count], unshared[:count], vlen[:count], size[:count]
        # only this block's key suffixes and values, gathered from wherever they are:
        # straight into rows when the buffers have room around them, else compacted first
        rows = slice(first, first + count)
        width = short_width(shared, unshared, vlen)
        key_rows = key_start[rows] + shared - 3
        value_rows = val_start[rows] - 3 - unshared
        if (
            width
            and records
            and rows_fit(key_rows, width, len(key_flat))
            and np.array_equal(val_start[rows], key_start[rows] + key_len[rows])
        ):
            block = gather_records(shared, unshared, vlen, key_flat, key_start[rows] + shared)
        elif (
            width and rows_fit(key_rows, width, len(key_flat)) and rows_fit(value_rows, width, len(val_flat))
        ):
            block = gather_rows(shared, unshared, vlen, key_flat, key_rows, val_flat, value_rows)
        else:
            block = gather_entries(
                shared,
                unshared,
                vlen,
                ragged_gather(key_flat, key_start[rows] + shared, unshared),
                np.cumsum(unshared) - unshared,
                ragged_gather(val_flat, val_start[rows], vlen),
                np.cumsum(vlen) - vlen,
            )
        restarts = (np.cumsum(size) - size)[::RESTART_INTERVAL]
        handle = write_block(finish_block(block, restarts.tolist()))
        last = first + count - 1
        separator = (
            _shortest_separator(key_at(last), key_at(last + 1))
            if last + 1 < n
            else _short_successor(key_at(last))
        )
        index_block.add(separator, handle)
        first += count

    metaindex_handle = write_block(BlockBuilder(RESTART_INTERVAL).finish())
    index_handle = write_block(index_block.finish())
    footer = metaindex_handle + index_handle
    footer += bytes(40 - len(footer))
    footer += encode_fixed32(MAGIC & 0xFFFFFFFF) + encode_fixed32(MAGIC >> 32)
    out.extend(footer)
    return out


def _read_handle(buf, pos: int) -> tuple[int, int, int]:
    offset, pos = decode_varint(buf, pos)
    size, pos = decode_varint(buf, pos)
    return offset, size, pos


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
        index = block_contents(data, index_offset, index_size, "index block")
        self._separators: list[bytes] = []
        self._blocks: list[memoryview] = []
        self._offsets: list[int] = []
        for separator, handle in block_entries(index, "index block"):
            offset, size, _ = _read_handle(handle, 0)
            self._separators.append(separator)
            self._blocks.append(block_contents(data, offset, size, "data block"))
            self._offsets.append(offset)
        self._parsed: dict[int | tuple[int, int], list[tuple[bytes, Any]]] = {}
        self._seekers: dict[int, BlockSeeker] = {}

    def __len__(self) -> int:
        """Number of data blocks."""
        return len(self._blocks)

    def block(self, i: int, views_over: int | None = None) -> list[tuple[bytes, bytes]]:
        """The entries of data block ``i``, checked and kept. ``views_over``: values longer
        than this are views of the table's buffer (kept apart from the copies)."""
        key = i if views_over is None else (i, views_over)
        entries = self._parsed.get(key)
        if entries is None:
            entries = block_entries(self._blocks[i], f"data block at offset {self._offsets[i]}", views_over)
            keys = [key for key, _ in entries]
            if (entries and i and keys[0] <= self._separators[i - 1]) or not all(
                map(operator.lt, keys, keys[1:])
            ):
                raise DecodeError(f"data block at offset {self._offsets[i]}: keys out of order")
            self._parsed[key] = entries
        return entries

    def range(
        self, lo: bytes, hi: bytes | None = None, views_over: int | None = None
    ) -> list[tuple[bytes, Any]]:
        """The entries with ``lo <= key < hi`` (``hi`` None: to the end), in key order;
        ``views_over``: as :meth:`block`'s."""
        out: list[tuple[bytes, bytes]] = []
        # block i holds keys in (separator[i-1], separator[i]], in order (checked by block())
        i = bisect.bisect_left(self._separators, lo)
        first = _key
        while i < len(self._blocks) and (hi is None or i == 0 or self._separators[i - 1] < hi):
            entries = self.block(i, views_over)
            start = bisect.bisect_left(entries, lo, key=first)
            stop = len(entries) if hi is None else bisect.bisect_left(entries, hi, key=first)
            out += entries[start:stop]
            i += 1
        return out

    def seeker(self, i: int) -> BlockSeeker:
        found = self._seekers.get(i)
        if found is None:
            found = self._seekers[i] = BlockSeeker(
                self._blocks[i], f"data block at offset {self._offsets[i]}"
            )
        return found

    def seek_range(self, lo: bytes, hi: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """``range(lo, hi)``, decoding only the restart runs that may hold such keys (a
        binary search over the index block, then over each block's restart points), so
        that a few keys of a table of millions cost microseconds. The runs decoded are
        checked (``BlockSeeker``), and lie inside their block's separators. With
        ``limit``, the first ``limit`` or more such entries (the runs that hold them)."""
        out: list[tuple[bytes, bytes]] = []
        i = bisect.bisect_left(self._separators, lo)
        j = self.seeker(i).last_restart_before(lo) if i < len(self._blocks) else 0
        while i < len(self._blocks) and (i == 0 or self._separators[i - 1] < hi):
            block = self.seeker(i)
            while j < len(block):
                run = self._checked_run(i, j)
                out += [(k, v) for k, v in run if lo <= k < hi]
                if run and run[-1][0] >= hi or (limit is not None and len(out) >= limit):
                    return out
                j += 1
            i, j = i + 1, 0
        return out

    def last_before(self, key: bytes) -> tuple[bytes, bytes] | None:
        """The entry with the greatest key below ``key`` (None: there is none), found as
        ``seek_range`` finds its first."""
        i = min(bisect.bisect_left(self._separators, key), len(self._blocks) - 1)
        while i >= 0:
            block = self.seeker(i)
            j = block.last_restart_before(key)
            while j >= 0 and len(block):
                below = [entry for entry in self._checked_run(i, j) if entry[0] < key]
                if below:
                    return below[-1]
                j -= 1
            i -= 1
        return None

    def _checked_run(self, i: int, j: int) -> list[tuple[bytes, bytes]]:
        run = self.seeker(i).run(j)
        if run and ((i and run[0][0] <= self._separators[i - 1]) or (run[-1][0] > self._separators[i])):
            raise DecodeError(f"data block at offset {self._offsets[i]}: keys outside the block's range")
        return run

    def items(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for i in range(len(self._blocks)):
            out.extend(self.block(i))
        return out


def read_table(data: bytes | memoryview) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` pairs of a table, checking every block's checksum."""
    return TableReader(data).items()
