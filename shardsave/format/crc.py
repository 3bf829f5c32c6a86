"""CRC32C (Castagnoli) and LevelDB's checksum masking.

The C implementation comes from the ``crc32c`` package, which uses the CPU's CRC
instructions and releases the GIL, so a second thread can checksum while another writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import crc32c as _crc32c
import numpy as np

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (any buffer), continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def mask(crc: int) -> int:
    """LevelDB's masking: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def masked_crc32c(data) -> int:
    return mask(crc32c(data))


# --- Combining checksums -------------------------------------------------------------
# crc(A + B) == shift(crc(A), len(B)) ^ crc(B), where shift(., n) is linear over GF(2)
# (crc(A) followed by n zero bytes, minus the constant that the zeros alone contribute).
# Its 32 columns are found with 33 CRCs over zeros, then folded into 4 byte tables so
# that one combine is 4 lookups: cheap enough to checksum every block of a tensor once
# and derive the whole tensor's checksum from the blocks.

_shift_tables: dict[int, tuple[list[int], ...]] = {}


def _tables_for(length: int) -> tuple[list[int], ...]:
    tables = _shift_tables.get(length)
    if tables is None:
        base = _crc_of_zeros(length, 0)
        cols = [_crc_of_zeros(length, 1 << bit) ^ base for bit in range(32)]
        tables = tuple([_fold(cols[8 * k : 8 * k + 8], b) for b in range(256)] for k in range(4))
        if len(_shift_tables) > 64:
            _shift_tables.clear()
        _shift_tables[length] = tables
    return tables


_ZEROS = bytes(1 << 20)


def _crc_of_zeros(length: int, value: int) -> int:
    """``crc32c(bytes(length), value)`` without making ``length`` bytes (a block size comes
    from the index, which may say anything)."""
    view = memoryview(_ZEROS)
    for start in range(0, length, len(_ZEROS)):
        value = crc32c(view[: min(len(_ZEROS), length - start)], value)
    return value


def _fold(cols: list[int], byte: int) -> int:
    out = 0
    for bit in range(8):
        if byte >> bit & 1:
            out ^= cols[bit]
    return out


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of A + B from the (unmasked) CRCs of A and B and the length of B."""
    if len_b == 0:
        return crc_a
    t0, t1, t2, t3 = _tables_for(len_b)
    shifted = t0[crc_a & 0xFF] ^ t1[crc_a >> 8 & 0xFF] ^ t2[crc_a >> 16 & 0xFF] ^ t3[crc_a >> 24]
    return shifted ^ crc_b


def run_crcs(masked_block_crcs: bytes, block_size: int, nbytes: int, run_blocks: int) -> list[int]:
    """The unmasked CRC32C of each run of ``run_blocks`` blocks of some ``nbytes`` bytes,
    derived from the masked CRCs of their ``block_size`` blocks (the last may be shorter).

    Checking a run of blocks with one CRC call against this is as strong as checking each
    block (CRC32C's Hamming distance is 4 up to 2**31 bits) and saves a Python call per
    64 KiB block, which cost a fifth of a restore's checking. The runs made of
    full-length blocks, all but at most the last, are folded together with numpy.
    """
    return runs_crcs([(masked_block_crcs, nbytes)], block_size, run_blocks)[0]


def runs_crcs(spans: Sequence[tuple[bytes, int]], block_size: int, run_blocks: int) -> list[list[int]]:
    """``run_crcs`` of each ``(masked_block_crcs, nbytes)``, all of ``block_size`` blocks in
    runs of ``run_blocks``: the full runs of every span are folded in one numpy pass, which
    costs about the same for one run as for thousands (160 us for one 32 MiB tensor)."""
    heads, tails, counts = [], [], []
    for masked, nbytes in spans:
        blocks = -(-nbytes // block_size)
        if len(masked) != 4 * blocks:
            raise ValueError(f"{len(masked)} bytes of block CRCs for {blocks} blocks")
        full = (nbytes // block_size) // run_blocks * run_blocks
        heads.append(masked[: 4 * full])
        tails.append((masked[4 * full :], nbytes - full * block_size))
        counts.append(full // run_blocks)
    crcs = _unmasked(b"".join(heads))
    folded: list[int] = []
    if len(crcs):
        runs = crcs.reshape(-1, run_blocks)
        t0, t1, t2, t3 = (np.array(t, np.uint32) for t in _tables_for(block_size))
        acc = runs[:, 0]
        for i in range(1, run_blocks):
            acc = t0[acc & 0xFF] ^ t1[acc >> 8 & 0xFF] ^ t2[acc >> 16 & 0xFF] ^ t3[acc >> 24] ^ runs[:, i]
        folded = acc.tolist()
    out, at = [], 0
    for count, (masked, left) in zip(counts, tails, strict=True):
        mine = folded[at : at + count]
        at += count
        if masked:  # the tail: fewer than run_blocks blocks, or a short last block
            rest = _unmasked(masked).tolist()
            acc = rest[0]
            for i, value in enumerate(rest[1:], 1):
                acc = combine(acc, value, min(block_size, left - i * block_size))
            mine.append(acc)
        out.append(mine)
    return out


def _unmasked(masked: bytes) -> np.ndarray:
    rot = np.frombuffer(masked, "<u4").astype(np.uint32) - np.uint32(_MASK_DELTA)
    return (rot >> np.uint32(17)) | (rot << np.uint32(15))


def masked_crc32cs(buffers: list) -> list[int]:
    """``mask(crc32c(b))`` for every buffer, the masking vectorized (many small tensors)."""
    crcs = np.fromiter(map(_crc32c.crc32c, buffers), np.uint64, len(buffers))
    return (((((crcs >> 15) | (crcs << 17)) & _U32) + _MASK_DELTA) & _U32).tolist()
