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
        cols = _shift_columns(length)
        tables = tuple([_fold(cols[8 * k : 8 * k + 8], b) for b in range(256)] for k in range(4))
        if len(_shift_tables) > 64:
            _shift_tables.clear()
        _shift_tables[length] = tables
    return tables


def _shift_columns(length: int) -> list[int]:
    """shift(1 << bit, length) for each of the 32 bits: the shift's matrix."""
    base = _crc_of_zeros(length, 0)
    return [_crc_of_zeros(length, 1 << bit) ^ base for bit in range(32)]


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
    runs of ``run_blocks``: the runs of every span are folded together by ``_fold_rows``,
    whose numpy passes cost about the same for one run as for thousands (one at a time,
    the runs of 32 MiB tensors took 3 ms a GiB)."""
    rows, tails, counts = [], [], []
    for masked, nbytes in spans:
        blocks = -(-nbytes // block_size)
        if len(masked) != 4 * blocks:
            raise ValueError(f"{len(masked)} bytes of block CRCs for {blocks} blocks")
        whole = nbytes // block_size  # blocks of full length: all but a short last one
        full = whole // run_blocks * run_blocks
        rows.append(masked[: 4 * full])
        # the tail: fewer than run_blocks whole blocks, padded at the left with empty
        # blocks (CRC 0: neutral), then maybe a short last block, combined after the fold
        tail = masked[4 * full : 4 * whole]
        rows.append(_MASKED_ZERO * (run_blocks - len(tail) // 4) + tail if tail else b"")
        short = nbytes - whole * block_size
        tails.append((bool(tail), masked[4 * whole :], short))
        counts.append(full // run_blocks)
    folded = _fold_rows(_unmasked(b"".join(rows)).reshape(-1, run_blocks), block_size).tolist()
    out, at = [], 0
    for count, (has_tail, last, short) in zip(counts, tails, strict=True):
        mine = folded[at : at + count]
        at += count
        if has_tail:
            mine.append(folded[at])
            at += 1
        if last:  # a short last block: a run of its own, or the end of the tail's
            value = int(_unmasked(last)[0])
            if has_tail:
                mine[-1] = combine(mine[-1], value, short)
            else:
                mine.append(value)
        out.append(mine)
    return out


_MASKED_ZERO = (_MASK_DELTA).to_bytes(4, "little")
"""mask(0): an empty block's CRC as stored, the padding of a tail."""


def _fold_rows(rows: np.ndarray, block_size: int) -> np.ndarray:
    """The CRC32C of each row's blocks one after the other, from their CRCs (``rows``:
    unmasked, each of ``block_size`` bytes; a zero CRC at the left may stand for an empty
    block). Neighbours are combined pairwise, a level at a time (log2 of the row's length
    numpy passes, so that a crafted checkpoint of 2-byte blocks, 512K to a run, folds as
    fast as 64 KiB ones): the rows are first padded at the left to a power of two with
    zeros, which are neutral, since a right-hand sibling holding padding always has a
    left-hand one that is all padding (CRC 0), shifted by any length to 0."""
    width = rows.shape[1]
    if not len(rows) or width == 0:
        return np.zeros(len(rows), np.uint32)
    padded = 1 << (width - 1).bit_length()
    if padded != width:
        rows = np.hstack([np.zeros((len(rows), padded - width), np.uint32), rows])
    tables = None
    length = block_size
    while rows.shape[1] > 1:
        tables = _np_shift_tables(length, tables)
        left, right = rows[:, 0::2], rows[:, 1::2]
        rows = _shifted(tables, left) ^ right
        length *= 2
    return rows[:, 0]


_np_tables: dict[int, tuple[np.ndarray, ...]] = {}
_UNIT_COLUMNS = np.uint32(1) << np.arange(32, dtype=np.uint32)


def _np_shift_tables(length: int, half: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, ...]:
    """``_tables_for(length)`` as numpy arrays. Given ``half``, the tables of
    ``length // 2``, the shift's columns are those of half's applied twice (a shift is
    linear, so shift(2n) is shift(n) twice): no CRCs over zeros, which cost a ms a table
    and made a crafted index of many block sizes slow."""
    tables = _np_tables.get(length)
    if tables is None:
        if half is None:
            cols = np.array(_shift_columns(length), np.uint32)
        else:
            cols = _shifted(half, _shifted(half, _UNIT_COLUMNS))
        tables = tuple(_byte_table(cols[8 * k : 8 * k + 8]) for k in range(4))
        if len(_np_tables) > 64:
            _np_tables.clear()
        _np_tables[length] = tables
    return tables


def _byte_table(cols: np.ndarray) -> np.ndarray:
    """The XOR of the columns each byte's set bits pick, for all 256 bytes."""
    table = np.zeros(256, np.uint32)
    for bit in range(8):
        n = 1 << bit
        table[n : 2 * n] = table[:n] ^ cols[bit]
    return table


def _shifted(tables: tuple[np.ndarray, ...], crcs: np.ndarray) -> np.ndarray:
    t0, t1, t2, t3 = tables
    return t0[crcs & 0xFF] ^ t1[crcs >> 8 & 0xFF] ^ t2[crcs >> 16 & 0xFF] ^ t3[crcs >> 24]


def _unmasked(masked: bytes) -> np.ndarray:
    rot = np.frombuffer(masked, "<u4").astype(np.uint32) - np.uint32(_MASK_DELTA)
    return (rot >> np.uint32(17)) | (rot << np.uint32(15))


def masked_crc32cs(buffers: list) -> list[int]:
    """``mask(crc32c(b))`` for every buffer, the masking vectorized (many small tensors)."""
    crcs = np.fromiter(map(_crc32c.crc32c, buffers), np.uint64, len(buffers))
    return (((((crcs >> 15) | (crcs << 17)) & _U32) + _MASK_DELTA) & _U32).tolist()
