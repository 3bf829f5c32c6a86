"""One block of a LevelDB table, as TensorFlow's ``core/lib/io/block_builder.cc`` writes it.

A block is a run of prefix-compressed entries ``varint32 shared, varint32 unshared,
varint32 value_len, key_suffix, value`` followed by fixed32 restart offsets and a fixed32
count; in the file it is followed by a 5-byte trailer, a compression type (0) and the
masked CRC32C of the block plus that type byte. Building works column-wise in numpy (an
index holds one entry per tensor or piece, up to millions); reading checks the trailer.
"""

from __future__ import annotations

import struct
from typing import Any

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
    if short_width(shared, unshared, vlen):
        return _gather_short(shared, unshared, vlen, key_bytes, key_from, value_bytes, value_from)
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


def _gather_short(shared, unshared, vlen, key_bytes, key_from, value_bytes, value_from) -> np.ndarray:
    """``gather_entries`` when every header varint is one byte and entries are short (the
    pieces of sliced tensors): ``gather_rows`` over the pieces padded at both ends."""
    width = 3 + int(unshared.max()) + int(vlen.max())
    pad = np.zeros(width, np.uint8)
    keys = np.concatenate([pad, np.asarray(key_bytes, np.uint8), pad])
    values = np.concatenate([pad, np.asarray(value_bytes, np.uint8), pad])
    return gather_rows(
        shared, unshared, vlen, keys, key_from + width - 3, values, value_from + width - 3 - unshared
    )


def short_width(shared, unshared, vlen) -> int | None:
    """The row width ``gather_rows`` needs for these entries, None if they do not suit it
    (a header varint of more than a byte, or an entry longer than ``_WINDOW_MAX``)."""
    if not len(shared) or max(int(shared.max()), int(unshared.max()), int(vlen.max())) >= 0x80:
        return None
    width = 3 + int(unshared.max()) + int(vlen.max())
    return width if width <= _WINDOW_MAX else None


def gather_rows(shared, unshared, vlen, keys, key_rows, values, value_rows) -> np.ndarray:
    """A block's entries as rows of a matrix as wide as the longest: header bytes, then
    the key suffix from a window over ``keys`` starting at ``key_rows`` (column c: byte
    ``c - 3`` of the suffix), then the value from a window over ``values`` starting at
    ``value_rows`` (shifted by the suffix's length); the bytes past each entry dropped.
    The windows must lie inside the arrays (``rows_fit``)."""
    width = 3 + int(unshared.max()) + int(vlen.max())
    cols = np.arange(width)
    window = np.lib.stride_tricks.sliding_window_view
    rows = np.where(
        cols < 3 + unshared[:, None], window(keys, width)[key_rows], window(values, width)[value_rows]
    )
    rows[:, 0], rows[:, 1], rows[:, 2] = shared, unshared, vlen
    return rows[cols < (3 + unshared + vlen)[:, None]]


def gather_records(shared, unshared, vlen, flat: np.ndarray, key_from: np.ndarray) -> np.ndarray:
    """``gather_entries`` of entries whose key and value lie back to back in ``flat``
    (a merge's records): each entry is one window over ``flat`` from 3 bytes before its
    key suffix, the header written over those 3, the bytes past the entry dropped. One
    row copy per entry: the cheapest gather there is for entries in random places."""
    width = 3 + int((unshared + vlen).max())
    rows = np.lib.stride_tricks.sliding_window_view(flat, width)[key_from - 3]
    rows[:, 0], rows[:, 1], rows[:, 2] = shared, unshared, vlen
    return rows[np.arange(width) < (3 + unshared + vlen)[:, None]]


def rows_fit(rows: np.ndarray, width: int, size: int) -> bool:
    return bool(len(rows)) and int(rows.min()) >= 0 and int(rows.max()) + width <= size


def ragged_gather(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([src[s:s+l] for s, l in zip(starts, lengths)])`` without the loop.

    Short strings (an index's keys and entries) are copied as rows of a window as wide as
    the longest and the bytes past each one's length dropped with a mask: a byte of mask
    per byte moved, where the general path builds an 8-byte index per byte."""
    n = len(starts)
    width = int(lengths.max()) if n else 0
    if 0 < width <= _WINDOW_MAX and n * width <= 4 * int(lengths.sum()) + 64:
        starts = np.asarray(starts, np.int64)
        fits = starts + width <= len(src)
        if fits.all():
            rows = np.lib.stride_tricks.sliding_window_view(src, width)[starts]
            return rows[np.arange(width) < lengths[:, None]]
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return src[np.arange(total) + np.repeat(starts - out_starts, lengths)]


_WINDOW_MAX = 256


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


def block_entries(contents: memoryview, what: str, views_over: int | None = None) -> list[tuple[bytes, Any]]:
    """The ``(key, value)`` entries of a block. ``views_over``: values longer than this
    are views of ``contents`` (memoryview), not copies (a full entry's list of slices, MBs
    in an index of millions of pieces that a node's ranks share)."""
    num_restarts = decode_fixed32(contents, len(contents) - 4)
    limit = len(contents) - 4 - 4 * num_restarts
    if num_restarts == 0 or limit < 0:
        raise DecodeError(f"{what}: bad restart count {num_restarts}")
    block = bytes(contents[:limit])  # bytes slicing is cheaper than memoryview's
    restarts = np.frombuffer(contents, "<u4", num_restarts, limit).astype(np.int64)
    fast = _entries_by_restart(block, restarts, views_over)
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
        long = views_over is not None and vlen > views_over
        append((key, contents[end : end + vlen] if long else block[end : end + vlen]))
        pos = end + vlen
    return entries


def _entries_by_restart(block: bytes, restarts: np.ndarray, views_over: int | None = None) -> list | None:
    """The entries of a block whose entry headers are all one-byte varints, found for all
    restart runs at once (numpy steps through the k-th entry of every run together), so
    only the keys are assembled one by one. None when the block does not fit that shape
    (long keys or values, damage): the sequential parser then decodes or rejects it."""
    limit = len(block)
    if views_over is not None and views_over < 0x7F:  # values here are under 0x80 bytes
        return None  # the sequential parser makes the views
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


class BlockSeeker:
    """One block read as LevelDB's ``Block::Iter::Seek`` does: a binary search over its
    restart points (whose keys are stored whole), then only the runs of entries from there
    decoded. The restart array is checked once (inside the block, strictly increasing);
    every run decoded is checked as ``block_entries`` checks a block: in bounds, a restart
    entry sharing nothing, keys strictly increasing."""

    def __init__(self, contents: memoryview, what: str):
        num_restarts = decode_fixed32(contents, len(contents) - 4)
        limit = len(contents) - 4 - 4 * num_restarts
        if num_restarts == 0 or limit < 0:
            raise DecodeError(f"{what}: bad restart count {num_restarts}")
        restarts = np.frombuffer(contents, "<u4", num_restarts, limit).astype(np.int64)
        if restarts[0] != 0 or np.any(np.diff(restarts) <= 0) or (limit and restarts[-1] >= limit):
            raise DecodeError(f"{what}: restart offsets out of order or past the entries")
        self.what = what
        self.block = contents[:limit]  # not copied: a seek decodes one or two runs of it
        self.restarts = restarts.tolist()
        self._keys: dict[int, bytes] = {}

    def __len__(self) -> int:
        """Number of restart runs."""
        return len(self.restarts) if len(self.block) else 0

    def restart_key(self, j: int) -> bytes:
        key = self._keys.get(j)
        if key is None:
            entries = self._decode(j, first_only=True)
            key = self._keys[j] = entries[0][0]
        return key

    def run(self, j: int) -> list[tuple[bytes, bytes]]:
        """The entries of restart run ``j``."""
        return self._decode(j)

    def last_restart_before(self, key: bytes) -> int:
        """The last run whose first key is below ``key`` (0 if none is)."""
        lo, hi = 0, len(self) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.restart_key(mid) < key:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _decode(self, j: int, first_only: bool = False) -> list[tuple[bytes, bytes]]:
        """The entries of run ``j`` (its first only), from a copy of that run alone: an
        entry reaching past its run is damage."""
        base = self.restarts[j]
        stop = self.restarts[j + 1] if j + 1 < len(self.restarts) else len(self.block)
        block = bytes(self.block[base:stop])
        pos, limit, out, key = 0, len(block), [], b""
        while pos < limit:
            shared, pos = decode_varint(block, pos, limit)
            unshared, pos = decode_varint(block, pos, limit)
            vlen, pos = decode_varint(block, pos, limit)
            end = pos + unshared
            if shared > len(key) or end + vlen > limit or (not out and shared):
                if end + vlen > limit and end + vlen <= len(self.block) - base:
                    raise DecodeError(f"{self.what}: an entry runs across a restart point")
                raise DecodeError(f"{self.what}: corrupt entry at block offset {base + pos}")
            new = key[:shared] + block[pos:end]
            if out and not key < new:
                raise DecodeError(f"{self.what}: keys out of order at block offset {base + pos}")
            key = new
            out.append((key, block[end : end + vlen]))
            pos = end + vlen
            if first_only:
                break
        return out
