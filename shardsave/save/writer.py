"""Streams one rank's tensors into its data file and returns their index entries.

Large arrays go to storage straight from their own buffers (no ``tobytes`` copy) while a
second thread checksums them, so the CRC is off the critical path; small ones are packed
into one buffer so that many tiny variables cost a few large writes, not one each.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import storage
from ..format import crc, dtypes
from ..format.columns import encode_plain_columns, split_values
from ..format.entry import encode_entry
from ..format.strings import encode_strings

CHECKSUM_BLOCK = 64 * 1024
"""Entries larger than this carry one CRC per block (entry.py extension fields)."""
BATCH_BYTES = 4 << 20
"""Arrays smaller than this are gathered into one buffer before writing."""


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying."""
    try:
        return memoryview(array).cast("B")  # 0.3 us, against 1.1 us through numpy views
    except (TypeError, ValueError):  # a dtype the buffer protocol cannot name (bfloat16)
        return memoryview(array.reshape(-1).view(np.uint8))


def checksum_blocks(data: memoryview, block: int = CHECKSUM_BLOCK) -> tuple[int, bytes]:
    """``(masked whole CRC, packed masked block CRCs)``; blocks only when data > block."""
    if len(data) <= block:
        return crc.mask(crc.crc32c(data)), b""
    whole = 0
    packed = bytearray()
    for start in range(0, len(data), block):
        piece = data[start : start + block]
        c = crc.crc32c(piece)
        whole = crc.combine(whole, c, len(piece))
        packed += crc.mask(c).to_bytes(4, "little")
    return crc.mask(whole), bytes(packed)


def entry_crc(array: np.ndarray) -> int:
    """The masked CRC32C the data file entry of ``array`` gets, without writing it."""
    if dtypes.to_tf(array.dtype) == dtypes.DT_STRING:
        return encode_strings(array)[1]
    return crc.masked_crc32c(byte_view(np.ascontiguousarray(array)))


def entry_crcs(arrays: Sequence[np.ndarray]) -> list[int]:
    """:func:`entry_crc` of every array; the small plain ones in bulk, as the writer does."""
    out = [0] * len(arrays)
    small = [i for i, a in enumerate(arrays) if a.nbytes <= CHECKSUM_BLOCK and not a.dtype.hasobject]
    for i, masked in zip(small, crc.masked_crc32cs([arrays[i].tobytes() for i in small]), strict=True):
        out[i] = masked
    done = set(small)
    for i, array in enumerate(arrays):
        if i not in done:
            out[i] = entry_crc(array)
    return out


def data_size(arrays: Sequence[np.ndarray]) -> int:
    """How many bytes :func:`write_data_file` writes for ``arrays`` (strings encoded)."""
    total = 0
    for array in arrays:
        if dtypes.to_tf(array.dtype) == dtypes.DT_STRING:
            total += len(encode_strings(array)[0])
        else:
            total += array.nbytes
    return total


def write_data_file(
    out: storage.Writer,
    keys: Sequence[bytes],
    arrays: Sequence[np.ndarray],
    shard_id: int,
    crcs: list[int] | None = None,
    base: int = 0,
) -> tuple[list[bytes], bytes, np.ndarray]:
    """Write ``arrays`` in order; return their index entries: the keys, the encoded
    entries back to back, and the length of each. ``crcs``, if given, receives every
    entry's masked CRC32C (as :func:`entry_crc` computes it). ``base``: where the first
    array starts in data file ``shard_id`` (``out`` may be a sender to the rank that
    writes that file: save/gather.py); ``out`` needs only ``write(buffer)``.

    Arrays up to one checksum block are handled column-wise (copies, checksums and index
    entries in bulk): a model may have tens of thousands of them, and a loop of Python
    statements per array would cost more than their bytes.
    """
    n = len(arrays)
    dts = [a.dtype for a in arrays]
    tf_of = {dt: dtypes.to_tf(dt) for dt in set(dts)}
    types = [tf_of[dt] for dt in dts]
    shapes = [a.shape for a in arrays]
    sizes = [a.nbytes for a in arrays]
    masks: list[int] = [0] * n
    blocks: dict[int, bytes] = {}  # entry number -> its packed block CRCs
    end = list(itertools.accumulate(sizes, initial=0))  # byte positions if all were plain
    others = np.flatnonzero((np.asarray(sizes) > CHECKSUM_BLOCK) | (np.asarray(types) == dtypes.DT_STRING))
    batch = _Batch(out)
    with ThreadPoolExecutor(1) as checksummer:
        i = 0
        for j in [*others.tolist(), n]:
            while i < j:  # arrays i..j-1 are tiny: as many per batch as fit
                stop = max(i + 1, min(j, bisect.bisect_right(end, end[i] + BATCH_BYTES, i + 1, j + 1) - 1))
                datas = [a.tobytes() for a in arrays[i:stop]]
                masks[i:stop] = crc.masked_crc32cs(datas)
                batch.add(b"".join(datas))
                i = stop
            if j == n:
                break
            array = arrays[j]
            if types[j] == dtypes.DT_STRING:
                data, masks[j] = encode_strings(array)
                sizes[j] = len(data)
                batch.add(data)
            elif sizes[j] < BATCH_BYTES:
                # one copy into the batch is cheapest (tobytes also handles non-contiguous
                # arrays and ml_dtypes)
                data = array.tobytes()
                masks[j], blocks[j] = checksum_blocks(memoryview(data))
                batch.add(data)
            else:  # large: straight from its own buffer, checksummed by a second thread
                batch.flush()
                view = byte_view(np.ascontiguousarray(array))
                pending = checksummer.submit(checksum_blocks, view)
                out.write(view)
                masks[j], blocks[j] = pending.result()
            i = j + 1
        batch.flush()
    if crcs is not None:
        crcs[:] = masks
    offsets = list(itertools.accumulate(sizes, initial=base))[:-1]
    values, lengths = encode_plain_columns(types, shapes, shard_id, offsets, sizes, masks)
    if any(blocks.values()):  # large entries also list their block checksums
        entries = split_values(values, lengths)
        for j, packed in blocks.items():
            if packed:
                entries[j] = encode_entry(
                    types[j],
                    shapes[j],
                    shard_id,
                    offsets[j],
                    sizes[j],
                    masks[j],
                    block_size=CHECKSUM_BLOCK,
                    block_crcs=packed,
                )
        values, lengths = b"".join(entries), np.fromiter(map(len, entries), np.int64, len(entries))
    return list(keys), values, lengths


class _Batch:
    """Small pieces gathered into writes of about BATCH_BYTES."""

    def __init__(self, out: storage.Writer):
        self.out, self.pieces, self.size = out, [], 0

    def add(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)
        if self.size >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pieces:
            self.out.write(self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces))
            self.pieces, self.size = [], 0
