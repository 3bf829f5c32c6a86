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
    append = entries.append
    batch = bytearray()
    pos = 0
    to_tf, crc32c, mask = dtypes.to_tf, crc.crc32c, crc.mask
    with ThreadPoolExecutor(1) as checksummer:
        for key, array in items:
            tf_type = to_tf(array.dtype)
            blocks = b""
            if tf_type == dtypes.DT_STRING:
                data, masked = encode_strings(array)
                size = len(data)
                batch += data
            elif array.nbytes < BATCH_BYTES:
                # small: one copy into the batch buffer is the cheapest path (tobytes
                # also handles non-contiguous arrays and ml_dtypes)
                data = array.tobytes()
                size = len(data)
                if size > CHECKSUM_BLOCK:
                    masked, blocks = checksum_blocks(memoryview(data))
                else:
                    masked = mask(crc32c(data))
                batch += data
            else:
                if batch:
                    out.write(batch)
                    batch = bytearray()
                view = byte_view(np.ascontiguousarray(array))
                size = len(view)
                pending = checksummer.submit(checksum_blocks, view)
                out.write(view)
                masked, blocks = pending.result()
            if len(batch) >= BATCH_BYTES:
                out.write(batch)
                batch = bytearray()
            append((key, BundleEntry(tf_type, array.shape, shard_id, pos, size, masked, (),
                                     CHECKSUM_BLOCK if blocks else 0, blocks)))
            pos += size
        if batch:
            out.write(batch)
    return entries
