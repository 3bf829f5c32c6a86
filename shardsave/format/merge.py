"""The coordinator's merge of every rank's index entries into one index file.

Each rank encodes its own entries (RankIndexPart) in parallel; the coordinator then only
adds one full entry per sliced tensor, sorts and concatenates, whatever the number of ranks.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from . import table
from .columns import split_values
from .entry import BundleEntry, Extent, slice_field
from .index import BundleHeader, entry_key
from .ordered_code import decode_slice_key


class RankIndexPart(NamedTuple):
    """What one rank sends the coordinator: its entries and slice protos, encoded.

    Encoding happens on every rank in parallel, so the coordinator's merge is a sort and
    a concatenation, whatever the number of ranks.
    """

    keys: list[bytes]
    """The key of every entry this rank wrote."""
    values: bytes
    """Their encoded BundleEntryProtos, back to back."""
    lengths: np.ndarray
    """The length of each."""
    slices: list[tuple[str, tuple[Extent, ...], bytes]]
    """``(name, extents, field)`` of every piece of a sliced tensor, where ``field`` is the
    TensorSliceProto encoded as field 7 (``slices``) of the tensor's full entry."""


def encode_rank_part(keys: list[bytes], values: bytes, lengths, sliced_names) -> RankIndexPart:
    """A rank's entries (keys, and their encodings back to back with their lengths), with
    the slice protos of the pieces of tensors in ``sliced_names``."""
    slices = []
    for key in keys:
        if key[:1] == b"\x00":
            name, extents = decode_slice_key(key)
            if name in sliced_names:  # as field 7 of the full entry, ready to concatenate
                slices.append((name, tuple(extents), slice_field(extents)))
    return RankIndexPart(list(keys), values, np.asarray(lengths, np.int64), slices)


def merge_index(
    num_shards: int, parts: Sequence[RankIndexPart], sliced: Mapping[str, tuple[int, tuple[int, ...]]]
) -> bytes:
    """The coordinator's merge: every rank's entries plus one full entry per sliced
    tensor (``sliced``: name -> (dtype, global shape)), listing its slices in order."""
    header = BundleHeader(num_shards=num_shards).encode()
    keys = [b"", *(key for part in parts for key in part.keys)]
    chunks = [header, *(part.values for part in parts)]
    lengths = [np.array([len(header)], np.int64), *(part.lengths for part in parts)]
    groups: dict[str, list[tuple[tuple[Extent, ...], bytes]]] = {name: [] for name in sliced}
    for part in parts:
        for name, extents, proto_bytes in part.slices:
            groups[name].append((extents, proto_bytes))
    full = []
    for name, (dtype, shape) in sliced.items():
        fields = [field for _, field in sorted(groups[name])]
        full.append(BundleEntry(dtype, tuple(shape)).encode() + b"".join(fields))
        keys.append(entry_key(name))
    chunks += full
    lengths.append(np.fromiter(map(len, full), np.int64, len(full)))
    values, value_len = b"".join(chunks), np.concatenate(lengths)
    if not all(map(operator.lt, keys, keys[1:])):  # ranks' entries interleave: sort them
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        pieces = split_values(values, value_len)
        values = b"".join([pieces[i] for i in order])
        value_len = value_len[order]
    return table.build_table_columns(keys, values, value_len)
