"""format/keysort.py against Python's own bytewise sort: the order, each key's common prefix
with the one before, and the first duplicate, for byte strings of any length (empty, with
zero bytes, prefixes of one another, longer than a word) laid out anywhere in one buffer."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsave.format import keysort

ALPHABET = st.sampled_from([b"\x00", b"\x01", b"a", b"b", b"\xff"])
KEYS = st.lists(st.lists(ALPHABET, max_size=20).map(b"".join), min_size=1, max_size=60)


def laid_out(keys: list[bytes], gaps: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys in one buffer, in a shuffled place each, with junk between them."""
    flat, starts = bytearray(), []
    for key, gap in zip(keys, gaps, strict=True):
        flat += os.urandom(gap)
        starts.append(len(flat))
        flat += key
    return np.frombuffer(bytes(flat), np.uint8), np.array(starts, np.int64), np.array(list(map(len, keys)))


def common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=300, deadline=None)
@given(KEYS, st.data())
def test_sort_keys_is_bytewise(keys, data):
    gaps = data.draw(st.lists(st.integers(0, 9), min_size=len(keys), max_size=len(keys)))
    flat, starts, lengths = laid_out(keys, gaps)
    order, shared, duplicate = keysort.sort_keys(flat, starts, lengths)
    want = sorted(range(len(keys)), key=lambda i: (keys[i], i))  # stable
    assert order.tolist() == want
    ordered = [keys[i] for i in want]
    assert shared.tolist() == [0] + [common_prefix(a, b) for a, b in zip(ordered, ordered[1:], strict=False)]
    dups = [i for i in range(1, len(ordered)) if ordered[i] == ordered[i - 1]]
    assert duplicate == (dups[0] if dups else None)


def test_words_read_zeros_past_each_key():
    keys = [b"", b"a", b"abcdefgh", b"abcdefghi", b"\x00" * 9]
    flat, starts, lengths = laid_out(keys, [3] * len(keys))
    flat = keysort.spare(flat, starts, lengths)
    for w in range(2):
        got = keysort.words(flat, starts, lengths, w)
        for key, word in zip(keys, got.tolist(), strict=True):
            assert word == int.from_bytes(key[8 * w : 8 * w + 8].ljust(8, b"\x00"), "big")
