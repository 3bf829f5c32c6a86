"""Streams one rank's tensors into its data file and returns their index entries.

Large arrays go to storage straight from their own buffers (no ``tobytes`` copy) while a
second thread checksums them, so the CRC is off the critical path; small ones are packed
into one buffer so that many tiny variables cost a few large writes, not one each.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import storage
from .format import crc, dtypes
from .format.bundle import BundleEntry
from .format.strings import encode_strings

CHECKSUM_BLOCK = 64 * 1024
"""Entries larger than this carry one CRC per block (bundle.py extension fields)."""
BATCH_BYTES = 4 << 20
"""Arrays smaller than this are gathered into one buffer before writing."""


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying."""
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


def write_data_file(
    out: storage.Writer,
    items: Iterable[tuple[bytes, np.ndarray]],
    shard_id: int,
) -> list[tuple[bytes, BundleEntry]]:
    """Write ``(key, array)`` items in order; return ``(key, entry)`` for the index."""
    entries: list[tuple[bytes, BundleEntry]] = []
    batch = bytearray()
    pos = 0
    with ThreadPoolExecutor(1) as checksummer:
        for key, array in items:
            tf_type = dtypes.to_tf(array.dtype)
            shape = tuple(int(d) for d in array.shape)
            if tf_type == dtypes.DT_STRING:
                data, masked = encode_strings(array)
                view, blocks = memoryview(data), b""
            else:
                view = byte_view(np.ascontiguousarray(array))
                masked = blocks = None
            if len(view) < BATCH_BYTES:
                if masked is None:
                    masked, blocks = checksum_blocks(view)
                batch += view
                if len(batch) >= BATCH_BYTES:
                    out.write(batch)
                    batch = bytearray()
            else:
                if batch:
                    out.write(batch)
                    batch = bytearray()
                pending = checksummer.submit(checksum_blocks, view)
                out.write(view)
                masked, blocks = pending.result()
            entries.append(
                (
                    key,
                    BundleEntry(
                        dtype=tf_type,
                        shape=shape,
                        shard_id=shard_id,
                        offset=pos,
                        size=len(view),
                        crc32c=masked,
                        block_size=CHECKSUM_BLOCK if blocks else 0,
                        block_crcs=blocks,
                    ),
                )
            )
            pos += len(view)
        if batch:
            out.write(batch)
    return entries
