"""The bundle index: BundleHeaderProto, and the sorted table of entries parsed into an Index.

Key ``b""`` holds the header; every other key is a tensor name (UTF-8) holding an entry
(entry.py), or an OrderedCode slice key (ordered_code.py) holding one piece of a sliced
tensor. Parsing checks what no caller should have to: block checksums, the header's
version and endianness, names, integer ranges and that slices match their full entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import proto, table
from .coding import DecodeError
from .columns import PLAIN_MAX, PlainColumns, decode_plain_columns
from .entry import BundleEntry, Extent, new_entry
from .ordered_code import (
    decode_slice_key,
    encode_slice_key,
    write_num_increasing,
    write_signed_num_increasing,
    write_string,
)
from .slices import decode_full_head

TENSOR_BUNDLE_VERSION = 1
LITTLE_ENDIAN = 0

_HEADER_WIRE = {1: proto.VARINT, 2: proto.VARINT, 3: proto.LENGTH_DELIMITED}
_VERSION_WIRE = {1: proto.VARINT, 2: proto.VARINT, 3: proto.VARINT}


@dataclass(frozen=True)
class BundleHeader:
    """The index's first entry (key ``b""``): number of data files, byte order, version."""

    num_shards: int = 1
    endianness: int = LITTLE_ENDIAN
    producer: int = TENSOR_BUNDLE_VERSION
    min_consumer: int = 0

    def encode(self) -> bytes:
        out = b""
        if self.num_shards:
            out += proto.varint_field(1, self.num_shards)
        if self.endianness:
            out += proto.varint_field(2, self.endianness)
        version = b""
        if self.producer:
            version += proto.varint_field(1, self.producer)
        if self.min_consumer:
            version += proto.varint_field(2, self.min_consumer)
        return out + proto.bytes_field(3, version)

    @classmethod
    def decode(cls, data: bytes) -> BundleHeader:
        values = {"num_shards": 0, "endianness": 0, "producer": 0, "min_consumer": 0}
        for num, _, value in proto.iter_fields(data, _HEADER_WIRE):
            if num == 1:
                values["num_shards"] = value
            elif num == 2:
                values["endianness"] = value
            elif num == 3:
                for vnum, _, vvalue in proto.iter_fields(value, _VERSION_WIRE):
                    if vnum == 1:
                        values["producer"] = vvalue
                    elif vnum == 2:
                        values["min_consumer"] = vvalue
        return cls(**values)


class Pieces(Mapping[str, dict[tuple[Extent, ...], BundleEntry]]):
    """For each sliced tensor, its pieces' entries by extents, decoded per tensor on use.

    The slice keys of one tensor are contiguous in the sorted index (they all start with
    the tensor's encoded name), so only the table blocks that hold them are parsed.
    """

    def __init__(self, reader: table.TableReader, counts: dict[str, Sequence]):
        self._reader = reader
        self._counts = counts  # name -> the slices its full entry lists (framed on use)
        self._cache: dict[str, dict[tuple[Extent, ...], BundleEntry]] = {}
        self._more: dict[tuple[str, int], bool] = {}

    def __getitem__(self, name: str) -> dict[tuple[Extent, ...], BundleEntry]:
        found = self._cache.get(name)
        if found is not None:
            return found
        if name not in self._counts:
            raise KeyError(name)
        prefix = _pieces_prefix(name)
        out: dict[tuple[Extent, ...], BundleEntry] = {}
        for key, value in self._reader.range(prefix, prefix + b"\xff"):
            try:
                key_name, extents = decode_slice_key(key)
            except ValueError as exc:
                raise DecodeError(f"bad slice key {key!r}: {exc}") from exc
            if key_name == name:
                entry = out[tuple(extents)] = BundleEntry.decode(value)
                problem = entry_problem(entry)
                if problem:
                    raise DecodeError(f"a piece of tensor {name!r}: {problem}")
        if len(out) != len(self._counts[name]):
            raise DecodeError(
                f"tensor {name!r}: its entry lists {len(self._counts[name])} slices, the index holds {len(out)}"
            )
        self._cache[name] = out
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._counts

    def more_than(self, name: str, count: int) -> bool:
        """Whether the index holds more than ``count`` slice keys of ``name``: counted from
        the keys (a restart run or two), not from the full entry's list, whose length a
        crafted index may inflate. DecodeError on damage in the runs decoded."""
        found = self._more.get((name, count))
        if found is None:
            prefix = _pieces_prefix(name)
            keys = self._reader.seek_range(prefix, prefix + b"\xff", limit=count + 1)
            found = self._more[name, count] = len(keys) > count
        return found

    def listed(self, name: str) -> Sequence:
        """The slices the full entry of ``name`` lists (a RawSlices for writers' layout)."""
        return self._counts[name]

    def starting_in(
        self, name: str, rank: int, lo: int | None, hi: int
    ) -> list[tuple[tuple[Extent, ...], bytes]]:
        """The pieces of ``name`` with ``rank`` dimensions whose first dimension starts in
        ``[lo, hi)`` (``lo`` None: from the first), as ``(extents, encoded entry)``, found
        by binary search (slice keys sort by name, rank, then start and length of each
        dimension as increasing numbers): no other piece's key or entry is decoded."""
        base = _slice_base(name, rank)
        start = base if lo is None else base + write_signed_num_increasing(lo)
        out = []
        for key, value in self._reader.seek_range(start, base + write_signed_num_increasing(hi)):
            out.append((_piece_extents(key, name, rank), value))
        return out

    def start_before(self, name: str, rank: int, x: int) -> int | None:
        """The greatest first-dimension start below ``x`` among the pieces of ``name`` with
        ``rank`` dimensions (None: no piece starts below ``x``)."""
        base = _slice_base(name, rank)
        found = self._reader.last_before(base + write_signed_num_increasing(x))
        if found is None or not found[0].startswith(base):
            return None
        return _piece_extents(found[0], name, rank)[0][0]

    def __iter__(self):
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)


class Entries(Mapping[str, BundleEntry]):
    """An index's plain and full entries by tensor name (a read-only mapping).

    Plain entries stay in the columns they were decoded into and become BundleEntry
    objects only when asked for one by one, so a restore of many small tensors can work
    on the columns (``row``, ``names``, ``columns``) without making an object per tensor.
    """

    def __init__(self, names: list[str], columns: PlainColumns, others: dict[str, BundleEntry]):
        self.names = names
        self.row = {name: i for i, name in enumerate(names)}
        self.columns = columns
        self._made = others  # the entries made so far, and those that are not plain
        self._lists: list | None = None

    def __getitem__(self, name: str) -> BundleEntry:
        entry = self._made.get(name)
        if entry is None:
            i = self.row[name]
            if self._lists is None:
                self._lists = self.columns.as_lists()
            entry = self._made[name] = new_entry((*(col[i] for col in self._lists), (), 0, b""))
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self.row

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _pieces_prefix(name: str) -> bytes:
    """What every slice key of ``name`` starts with."""
    return b"\x00" + write_string(name.encode("utf-8"))


def _slice_base(name: str, rank: int) -> bytes:
    return _pieces_prefix(name) + write_num_increasing(rank)


def _piece_extents(key: bytes, name: str, rank: int) -> tuple[Extent, ...]:
    try:
        key_name, extents = decode_slice_key(key)
    except ValueError as exc:
        raise DecodeError(f"bad slice key {key!r}: {exc}") from exc
    if key_name != name or len(extents) != rank:
        raise DecodeError(f"slice key {key!r} sorts among the pieces of {name!r} but is not one")
    return tuple(extents)


@dataclass(frozen=True)
class Index:
    """A parsed index: the header, the full entries by name, and the slice entries."""

    header: BundleHeader
    entries: Entries
    """Plain entries and the full entries of sliced tensors, by tensor name."""
    pieces: Mapping[str, dict[tuple[Extent, ...], BundleEntry]]
    """For each sliced tensor, its pieces' entries by extents (decoded on use)."""


def build_index(
    header: BundleHeader,
    entries: Iterable[tuple[bytes, BundleEntry]],
) -> bytes:
    """Serialize an index; ``entries`` are ``(key, entry)`` in any order."""
    items = sorted((key, entry.encode()) for key, entry in entries)
    return table.build_table([(b"", header.encode())] + items)


def entry_key(name: str, extents: Sequence[Extent] | None = None) -> bytes:
    """The index key of a plain tensor (``extents`` None) or of one piece of a sliced one."""
    if extents is None:
        return name.encode("utf-8")
    return encode_slice_key(name, extents)


def parse_index(data: bytes | memoryview) -> Index:
    """Parse an index file; raise DecodeError on damage.

    Every block's checksum is checked and the plain and full entries are decoded now; the
    pieces of a sliced tensor when first used (``Index.pieces[name]``, which may also
    raise DecodeError), so opening an index of a million slices stays cheap.
    """
    reader = table.TableReader(data)
    head = reader.block(0, PLAIN_MAX)[:2] if len(reader) else []
    if not head or head[0][0] != b"":
        raise DecodeError("index has no header entry")
    header = BundleHeader.decode(head[0][1])
    if header.endianness != LITTLE_ENDIAN:
        raise DecodeError("big-endian checkpoints are not supported")
    if header.min_consumer > TENSOR_BUNDLE_VERSION:
        raise DecodeError(f"checkpoint needs a reader of version {header.min_consumer}")
    # slice keys start with 0x00: names follow them; full entries' lists stay in ``data``
    items = reader.range(b"\x01", views_over=PLAIN_MAX)
    values = [value for _, value in items]
    names = _decode_names([key for key, _ in items])
    columns = decode_plain_columns(values)
    others: dict[str, BundleEntry] = {}
    counts: dict[str, Sequence] = {}
    for i in np.flatnonzero(~columns.plain).tolist():  # not plain: full entries, or the general decoder
        entry = others[names[i]] = decode_full_head(values[i]) or BundleEntry.decode(bytes(values[i]))
        if entry.slices:
            counts[names[i]] = entry.slices
    _check_ranges(names, columns, others)
    entries = Entries(names, columns, others)
    if len(entries.row) != len(names):
        raise DecodeError("index holds the same tensor name twice")
    if not counts and len(head) > 1 and head[1][0][:1] == b"\x00":
        _explain_slice_mismatch([k for k, _ in reader.range(b"\x00", b"\x01")], counts)
    return Index(header, entries, Pieces(reader, counts))


FIELD_LIMIT = 1 << 62
"""Shard ids, offsets, sizes and block sizes at or past this are damage (no file holds
4 EiB), rejected when the index is parsed, so that sums of two of them fit in an int64."""


def entry_problem(entry: BundleEntry) -> str | None:
    """What makes an entry's integer fields unusable, whatever its tensor (None: nothing)."""
    if (
        entry.shard_id < FIELD_LIMIT
        and entry.offset < FIELD_LIMIT
        and entry.size < FIELD_LIMIT
        and entry.block_size < FIELD_LIMIT
    ):
        return None
    return (
        f"shard_id {entry.shard_id}, offset {entry.offset}, size {entry.size} or crc32c_block_size "
        f"{entry.block_size} is out of range (2**62 or more)"
    )


def _check_ranges(names: list[str], columns: PlainColumns, others: dict[str, BundleEntry]) -> None:
    """``entry_problem`` of every plain and full entry: the plain ones column-wise."""
    limit = np.uint64(FIELD_LIMIT)
    bad = columns.plain & ((columns.shard_id >= limit) | (columns.offset >= limit) | (columns.size >= limit))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DecodeError(
            f"tensor {names[i]!r}: shard_id {int(columns.shard_id[i])}, offset "
            f"{int(columns.offset[i])} or size {int(columns.size[i])} is out of range (2**62 or more)"
        )
    for name, entry in others.items():
        problem = entry_problem(entry)
        if problem:
            raise DecodeError(f"tensor {name!r}: {problem}")


def _decode_names(keys: list[bytes]) -> list[str]:
    """The keys as tensor names, decoded in one call, joined by a byte no name holds, when
    there is one. A name that is not UTF-8 is damage: no writer can produce one (TF's and
    shardsave's names are Python strings), and no caller could print it."""
    joined = b"\x00".join(keys)
    try:
        if joined.count(b"\x00") == len(keys) - 1 and keys:
            return joined.decode("utf-8").split("\x00")
        return [key.decode("utf-8") for key in keys]
    except UnicodeDecodeError:
        bad = next(key for key in keys if not _is_utf8(key))
        raise DecodeError(f"tensor name {bad!r} is not UTF-8") from None


def _is_utf8(key: bytes) -> bool:
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _explain_slice_mismatch(slice_keys: list[bytes], counts: dict[str, int]) -> None:
    """Raise a DecodeError that says which slice entries do not match the full entries."""
    found: dict[str, int] = {}
    for key in slice_keys:
        try:
            name, _ = decode_slice_key(key)
        except ValueError as exc:
            raise DecodeError(f"bad slice key {key!r}: {exc}") from exc
        if name not in counts:
            raise DecodeError(f"slices of {name!r} have no full entry")
        found[name] = found.get(name, 0) + 1
    for name, count in counts.items():
        if found.get(name, 0) != count:
            raise DecodeError(
                f"tensor {name!r}: its entry lists {count} slices, the index holds {found.get(name, 0)}"
            )


__all__ = [
    "BundleHeader",
    "Entries",
    "Index",
    "Pieces",
    "build_index",
    "entry_key",
    "entry_problem",
    "parse_index",
]
