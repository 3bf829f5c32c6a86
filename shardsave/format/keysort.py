"""Byte strings held column-wise (one flat buffer, a start and a length each), sorted
bytewise in numpy, without a Python object per string.

An index of ten million slice entries has ten million keys; a list of bytes objects of
that size costs seconds to make and to sort. Here key ``i`` is read as 2-byte big-endian
digits (zero past its end) and the keys are sorted by all digits at once with
``np.lexsort`` (a radix sort per 16-bit digit), shorter first among equal digits: exactly
bytewise order, since a key padded with zeros ties only with a key that extends it by
zero bytes, and the shorter of those sorts first. Digits every key shares (the common
prefix of the names, mostly) are skipped: they order nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_WORD = 8


class SortedKeys(NamedTuple):
    order: np.ndarray
    """The permutation that sorts the keys (stable)."""
    shared: np.ndarray
    """For each key in sorted order, the length of its common prefix with the one before
    (0 for the first): what a table block's prefix compression needs."""
    duplicate: int | None
    """The first position (in sorted order) whose key equals the one before, if any."""


def spare(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``flat``, followed by a word of zeros unless it has a spare word past every key
    already, so that ``words`` can read past any key's end."""
    flat = np.asarray(flat, np.uint8)
    if not len(starts) or len(flat) >= int((starts + lengths).max()) + _WORD:
        return flat
    return np.concatenate([flat, np.zeros(_WORD, np.uint8)])


def words(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, w: int) -> np.ndarray:
    """Bytes ``8w .. 8w+7`` of every key as a big-endian uint64, zero past each key's end.
    ``flat`` must hold a spare word past every key (``spare``)."""
    view = np.ndarray((len(flat) - _WORD + 1,), ">u8", flat, 0, (1,))  # unaligned reads
    at = starts + _WORD * w
    np.minimum(at, len(view) - 1, out=at)
    out = view[at].astype(np.uint64)
    del at  # (in place from here: ten million keys make every temporary 80 MB)
    drop = lengths - _WORD * w
    np.clip(drop, 0, _WORD, out=drop)
    past = drop == 0  # no byte of this word is the key's
    drop -= _WORD
    drop *= -8  # bits past the end: 0..64
    np.minimum(drop, 63, out=drop)
    shift = drop.astype(np.uint64)
    del drop
    out >>= shift
    out <<= shift
    out[past] = 0
    return out


def sort_keys(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> SortedKeys:
    """Sort the keys bytewise; see the module's docstring.

    Empty keys, keys starting with ``00`` (an index's slice keys) and the others occupy
    three separate ranges of the order, so each group is sorted on its own: the digits
    that vary within a group are far fewer than across them (tensor names start at byte
    0 of plain keys and at byte 1 of slice keys)."""
    n = len(starts)
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    if n == 0:
        return SortedKeys(np.zeros(0, np.int64), np.zeros(0, np.int64), None)
    flat = spare(flat, starts, lengths)
    first = np.where(lengths > 0, flat[np.minimum(starts, len(flat) - 1)], 0).astype(np.int16)
    group = np.where(lengths == 0, 0, np.where(first == 0, 1, 2))
    orders, shareds, dups = [], [], []
    done = 0
    for g in range(3):
        rows = np.flatnonzero(group == g)
        if not len(rows):
            continue
        order, shared, dup = _sort_group(flat, starts[rows], lengths[rows])
        orders.append(rows[order])
        if done:  # the first key of a group shares nothing with the last of the one before
            shared[0] = 0
        shareds.append(shared)
        if dup is not None:
            dups.append(done + dup)
        done += len(rows)
    return SortedKeys(np.concatenate(orders), np.concatenate(shareds), min(dups) if dups else None)


def _sort_group(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> SortedKeys:
    n = len(starts)
    digits: list[tuple[int, np.ndarray]] = []  # (byte position, digit column) of varying digits
    for w in range(-(-int(lengths.max()) // _WORD)) if lengths.max() else ():
        word = words(flat, starts, lengths, w)
        if (word == word[0]).all():
            continue
        for k in range(4):
            digit = (word >> np.uint64(48 - 16 * k)).astype(np.uint16)
            if not (digit == digit[0]).all():
                digits.append((_WORD * w + 2 * k, digit))
    length_key = lengths.astype(np.uint16 if lengths.max() < 1 << 16 else np.int64)
    order = np.lexsort([length_key, *(d for _, d in reversed(digits))]) if n > 1 else np.zeros(1, np.int64)
    # common prefix with the previous key: the first digit that differs, capped by lengths
    sorted_len = length_key[order]
    shortest = np.minimum(sorted_len[1:], sorted_len[:-1])
    shared = shortest.copy()
    undecided = np.ones(n - 1, bool)
    for pos, digit in digits:
        s = digit[order]
        differ = undecided & (s[1:] != s[:-1])
        high = (s[1:] >> 8) != (s[:-1] >> 8)
        shared[differ] = np.minimum(pos + np.where(high[differ], 0, 1), shortest[differ])
        undecided &= ~differ
    dup = np.flatnonzero(undecided & (sorted_len[1:] == sorted_len[:-1]))
    return SortedKeys(
        order, np.concatenate([[0], shared]).astype(np.int64), int(dup[0]) + 1 if len(dup) else None
    )
