"""The full entry of a sliced tensor, decoded in two steps: its head now, its ``slices``
list (one TensorSliceProto per piece: ten thousand for a tensor of ten thousand ranks)
only when used.

A full entry as TF and shardsave write it is ``08 dtype 12 len shape`` followed by field 7
(``slices``) records only: fields in number order, no data fields (shard, offset, size,
checksum are zero and omitted). ``decode_full_head`` decodes such an entry's dtype and
shape and keeps the rest raw (``RawSlices``); anything else is left to the general
decoder (entry.py). The records are framed when the list is first used, and a field
other than 7 among them (which could override the head: protobuf's last value wins) is a
DecodeError then, as any damage in the list is: so the head is never used on its own
when the list says otherwise, and the parse of an index never walks the lists.
"""

from __future__ import annotations

from .coding import DecodeError, decode_varint
from .entry import BundleEntry, LazySlices, decode_shape_cached, decode_slice, new_entry

_TAG_SLICES = 0x3A  # field 7, length-delimited


class RawSlices(LazySlices):
    """A full entry's ``slices``: the entry's bytes from its first record on, framed into
    records on first use; each record decoded to extents only when asked for. ``data``
    may be a view of the index's buffer (shared by a node's ranks: parse_index), which
    is never handed out: ``raw`` and the records are bytes."""

    def __new__(cls, data: bytes | memoryview, start: int):
        self = tuple.__new__(cls)
        self._data, self._start = data, start
        self._bodies: list[tuple[int, int]] | None = None
        self._decoded = None
        return self

    def bodies(self) -> list[tuple[int, int]]:
        """``(start, stop)`` in the entry of every record's TensorSliceProto; DecodeError if
        the bytes are anything but field 7 records."""
        if self._bodies is None:
            self._bodies = _frame(self._data, self._start)
        return self._bodies

    def raw(self) -> bytes:
        """The records, exactly as stored (field 7 tags, lengths and bodies)."""
        return bytes(self._data[self._start :])

    def raw_len(self) -> int:
        return len(self._data) - self._start

    def extents(self, i: int) -> tuple:
        a, b = self.bodies()[i]
        return decode_slice(bytes(self._data[a:b]))

    def _value(self) -> tuple:
        if self._decoded is None:
            data = self._data
            self._decoded = tuple(decode_slice(bytes(data[a:b])) for a, b in self.bodies())
        return self._decoded

    def __len__(self) -> int:
        return len(self.bodies())

    def __bool__(self) -> bool:
        return True  # at least the first record's tag is there

    def __reduce__(self):
        return RawSlices, (bytes(self._data), self._start)


def _frame(data: bytes | memoryview, pos: int) -> list[tuple[int, int]]:
    out = []
    append = out.append
    end = len(data)
    while pos < end:
        if data[pos] != _TAG_SLICES:
            raise DecodeError(f"a full entry holds field tag {data[pos]:#x} among its slices")
        if pos + 1 < end and data[pos + 1] < 0x80:
            length, pos = data[pos + 1], pos + 2
        else:
            length, pos = decode_varint(data, pos + 1)
        if pos + length > end:
            raise DecodeError("a slice of a full entry runs past the entry")
        append((pos, pos + length))
        pos += length
    return out


def decode_full_head(data: bytes | memoryview) -> BundleEntry | None:
    """A full entry's dtype, shape and raw slices, if it has the layout writers give it
    (module docstring); None otherwise (the general decoder then decodes or rejects it)."""
    end = len(data)
    if end < 5 or data[0] != 0x08 or data[1] > 0x7F or data[2] != 0x12 or data[3] > 0x7F:
        return None
    pos = 4 + data[3]
    if pos >= end or data[pos] != _TAG_SLICES:
        return None
    return new_entry(
        (data[1], decode_shape_cached(bytes(data[4:pos])), 0, 0, 0, 0, RawSlices(data, pos), 0, b"")
    )
