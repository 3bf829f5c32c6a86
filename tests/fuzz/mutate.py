"""Cases: a seed checkpoint plus mutations, as JSON-able data, and how to apply them.

A case is ``{"seed": name, "muts": [mutation, ...], "fix_table": bool, "fix_crc": mode}``.
A mutation is a list whose first element names its kind:

- ``["entry", which, field, op, a, b, c]``: a decoded field of an index entry (``which``
  counts the entries after the header, modulo their number): dtype, shard_id, offset,
  size, crc32c, block_size (``op`` set / add / mul with ``a``), shape (set_dim, append,
  drop, rank), slices (set_start, set_length, add_dim, drop_dim, dup, drop, whole),
  block_crcs (truncate, append, flip).
- ``["piece", which, dim, start, length, reshape]``: move one piece of a sliced tensor
  consistently: the same new extent in its key and in the full entry's slice list (and
  its shape when ``reshape``), which is what a crafted file does.
- ``["key", which, op, a]``: rename an entry (non_utf8, suffix, copy another's name).
- ``["header", field, value]``: num_shards, endianness, producer, min_consumer.
- ``["raw", which, op, a]``: an encoding-level edit of an entry's bytes (an unknown
  field, a wrong wire type, a field given twice, a truncated value).
- ``["bytes", region, pos, op, value]``: bytes of the index file (``region`` "block": the
  contents of a table block; "any": anywhere, also inserting or deleting).
- ``["data", shard, op, a]``: a data file: truncate, extend, flip.
- ``["strings", which, element, length]``: give one element of a string tensor (plain or
  piece) another length, with the lengths' checksum recomputed; the new encoding is
  appended to the data file and the entry points at it.

``fix_table`` recomputes every table block's checksum after the byte edits; ``fix_crc``
("none", "touched", "all") recomputes the entry CRC32C and block CRCs from the bytes
really in the data file, for the entries the mutations touched or for all of them.
Integers may be anything (negative, >= 2**64): the encoder writes them as varints of
their 64-bit two's complement, or longer, as a crafted file may.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import dataclass, field

from hypothesis import strategies as st

from shardsave.format import block, crc, table
from shardsave.format.coding import decode_varint, encode_fixed32, encode_varint
from shardsave.format.entry import FIELD_BLOCK_CRCS, FIELD_BLOCK_SIZE, BundleEntry
from shardsave.format.index import BundleHeader
from shardsave.format.ordered_code import (
    read_num_increasing,
    read_signed_num_increasing,
    read_string,
    write_num_increasing,
    write_signed_num_increasing,
    write_string,
)

from .seeds import PREFIX, SEED_NAMES

INT_FIELDS = ("dtype", "shard_id", "offset", "size", "crc32c", "block_size")
CRC_CAP = 1 << 28  # entries larger than this get no recomputed checksums (none are real)


# ----------------------------------------------------------------------------- encoding
def varint(value: int) -> bytes:
    """A varint of any int: negative ones (of any size) as their 64-bit two's complement."""
    return encode_varint(value & ((1 << 64) - 1) if value < 0 else value)


def _field(number: int, wire: int, body: bytes) -> bytes:
    return varint(number << 3 | wire) + body


def _len_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, varint(len(data)) + data)


def encode_extent(start: int, length: int) -> bytes:
    if (start, length) == (0, -1):
        return _len_field(1, b"")
    body = (_field(1, 0, varint(start)) if start else b"") + _field(2, 0, varint(length))
    return _len_field(1, body)


def encode_entry(f: dict) -> bytes:
    """A BundleEntryProto from a field dict, in field order (so the fast decoders see it)."""
    out = _field(1, 0, varint(f["dtype"])) if f["dtype"] else b""
    shape = b"".join(_len_field(2, _field(1, 0, varint(d)) if d else b"") for d in f["shape"])
    out += _len_field(2, shape)
    for number, name in ((3, "shard_id"), (4, "offset"), (5, "size")):
        if f[name]:
            out += _field(number, 0, varint(f[name]))
    if f["crc32c"]:
        out += _field(6, 5, (f["crc32c"] & 0xFFFFFFFF).to_bytes(4, "little"))
    for sl in f["slices"]:
        out += _len_field(7, b"".join(encode_extent(s, n) for s, n in sl))
    if f["block_size"]:
        out += _field(FIELD_BLOCK_SIZE, 0, varint(f["block_size"]))
        out += _len_field(FIELD_BLOCK_CRCS, f["block_crcs"])
    return out


def slice_key(name: bytes, extents) -> bytes:
    parts = [write_num_increasing(0), write_string(name), write_num_increasing(len(extents))]
    for start, length in extents:
        parts += [write_signed_num_increasing(start), write_signed_num_increasing(length)]
    return b"".join(parts)


def parse_slice_key(key: bytes) -> tuple[bytes, list[list[int]]] | None:
    """``(name bytes, extents)`` of a slice key, or None; no range checks (crafted keys)."""
    try:
        lead, pos = read_num_increasing(key, 0)
        name, pos = read_string(key, pos)
        rank, pos = read_num_increasing(key, pos)
        if lead != 0 or rank > 64:
            return None
        extents = []
        for _ in range(rank):
            start, pos = read_signed_num_increasing(key, pos)
            length, pos = read_signed_num_increasing(key, pos)
            extents.append([start, length])
    except (ValueError, IndexError):
        return None
    return (name, extents) if pos == len(key) else None


def entry_fields(e: BundleEntry) -> dict:
    return {
        "dtype": e.dtype,
        "shape": list(e.shape),
        "shard_id": e.shard_id,
        "offset": e.offset,
        "size": e.size,
        "crc32c": e.crc32c,
        "slices": [[list(x) for x in sl] for sl in e.slices],
        "block_size": e.block_size,
        "block_crcs": e.block_crcs,
    }


# ----------------------------------------------------------------------------- the model
@dataclass
class Item:
    """One index entry being mutated: ``fields`` (decoded) unless ``raw`` overrides them;
    a piece also keeps its tensor's name and extents (its key is rebuilt from them)."""

    key: bytes
    kind: str  # header, entry, piece
    fields: dict | None = None
    header: dict | None = None
    raw: bytes | None = None
    name: bytes = b""
    extents: list = field(default_factory=list)
    touched: bool = False

    def value(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if self.kind == "header":
            h = self.header
            body = b"".join(
                _field(n, 0, varint(h[k])) for n, k in ((1, "num_shards"), (2, "endianness")) if h[k]
            )
            version = b"".join(
                _field(n, 0, varint(h[k])) for n, k in ((1, "producer"), (2, "min_consumer")) if h[k]
            )
            return body + _len_field(3, version)
        return encode_entry(self.fields)

    def final_key(self) -> bytes:
        return slice_key(self.name, self.extents) if self.kind == "piece" else self.key


def load_items(index_bytes: bytes) -> list[Item]:
    items = []
    for key, value in table.read_table(index_bytes):
        value = bytes(value)
        if key == b"":
            h = BundleHeader.decode(value)
            items.append(Item(key, "header", header=h.__dict__.copy()))
            continue
        item = Item(key, "entry", fields=entry_fields(BundleEntry.decode(value)))
        parsed = parse_slice_key(key) if key[:1] == b"\x00" else None
        if parsed is not None:
            item.kind, item.name, item.extents = "piece", parsed[0], parsed[1]
        items.append(item)
    return items


# ----------------------------------------------------------------------------- mutations
def _int_op(old: int, op: str, a: int) -> int:
    return {"set": a, "add": old + a, "mul": old * a}[op]


def _mutate_shape(shape: list, op: str, a: int, b: int) -> list:
    if op == "set_dim" and shape:
        shape[b % len(shape)] = a
    elif op == "append":
        shape.append(a)
    elif op == "drop" and shape:
        shape.pop(b % len(shape))
    elif op == "rank":
        shape[:] = [1] * (abs(a) % 80)
    return shape


def _mutate_slices(slices: list, op: str, a: int, b: int, c: int) -> None:
    if not slices:
        return
    sl = slices[b % len(slices)]
    if op == "set_start" and sl:
        sl[c % len(sl)][0] = a
    elif op == "set_length" and sl:
        sl[c % len(sl)][1] = a
    elif op == "whole" and sl:
        sl[c % len(sl)] = [0, -1]
    elif op == "add_dim":
        sl.append([0, -1] if a < 0 else [0, a])
    elif op == "drop_dim" and sl:
        sl.pop(c % len(sl))
    elif op == "dup":
        slices.append(copy.deepcopy(sl))
    elif op == "drop":
        slices.remove(sl)


def _mutate_entry(f: dict, name: str, op: str, a: int, b: int, c: int) -> None:
    if name in INT_FIELDS:
        f[name] = _int_op(f[name], op, a)
    elif name == "shape":
        _mutate_shape(f["shape"], op, a, b)
    elif name == "slices":
        _mutate_slices(f["slices"], op, a, b, c)
    elif name == "block_crcs":
        crcs = bytearray(f["block_crcs"])
        if op == "truncate":
            del crcs[abs(a) % (len(crcs) + 1) :]
        elif op == "append":
            crcs += (a & 0xFFFFFFFF).to_bytes(4, "little")
        elif op == "flip" and crcs:
            crcs[abs(a) % len(crcs)] ^= 0xFF
        f["block_crcs"] = bytes(crcs)
        if not f["block_size"]:
            f["block_size"] = 65536


def _move_piece(items: list[Item], m: list) -> None:
    _, which, dim, start, length, reshape = m
    pieces = [it for it in items if it.kind == "piece" and it.raw is None]
    if not pieces:
        return
    piece = pieces[which % len(pieces)]
    if not piece.extents:
        return
    full = next((it for it in items if it.kind == "entry" and it.key == piece.name and it.fields), None)
    d = dim % len(piece.extents)
    old = list(map(list, piece.extents))
    piece.extents[d] = [start, length]
    piece.touched = True
    if reshape and length >= 0 and len(piece.fields["shape"]) > d:
        piece.fields["shape"][d] = length
    if full is not None:
        for sl in full.fields["slices"]:
            if sl == old:
                sl[d] = [start, length]
        full.touched = True


def _rename(items: list[Item], m: list) -> None:
    _, which, op, a = m
    named = [it for it in items if it.kind != "header"]
    item = named[which % len(named)]
    if op == "non_utf8":
        new = (item.name if item.kind == "piece" else item.key) + bytes([0x80 | (a & 0x7F), 0xFF])
    elif op == "suffix":
        new = (item.name if item.kind == "piece" else item.key) + str(a)[:3].encode()
    else:  # copy another entry's name
        other = named[abs(a) % len(named)]
        new = other.name if other.kind == "piece" else other.key
    if item.kind == "piece":
        item.name = new
    elif new:  # the header keeps the empty key
        # its pieces follow the full entry (a consistent rename), half the time
        if a % 2 == 0:
            for it in items:
                if it.kind == "piece" and it.name == item.key:
                    it.name = new
        item.key = new
    item.touched = True


def _raw_edit(items: list[Item], m: list) -> None:
    _, which, op, a = m
    named = [it for it in items if it.kind != "header"]
    item = named[which % len(named)]
    value = item.value()
    if op == "unknown_field":
        value += _field(900 + abs(a) % 100, 0, varint(a))
    elif op == "wrong_wire":  # a known field (1..7, 1000, 1001) with another wire type
        number = (1, 2, 3, 4, 5, 6, 7, FIELD_BLOCK_SIZE, FIELD_BLOCK_CRCS)[abs(a) % 9]
        value += _field(number, 2 if number not in (2, 7, FIELD_BLOCK_CRCS) else 0, varint(3) + b"abc")
    elif op == "twice":  # protobuf: the last value of a scalar wins, repeated ones append
        value += value
    elif op == "truncate":
        value = value[: abs(a) % (len(value) + 1)]
    item.raw = value
    item.touched = True


def apply_model_mutations(items: list[Item], muts: list) -> None:
    header = next(it for it in items if it.kind == "header")
    named = [it for it in items if it.kind != "header"]
    for m in muts:
        kind = m[0]
        if kind == "entry" and named:
            item = named[m[1] % len(named)]
            if item.raw is None:
                _mutate_entry(item.fields, *m[2:])
                item.touched = True
        elif kind == "piece":
            _move_piece(items, m)
        elif kind == "key" and named:
            _rename(items, m)
        elif kind == "header":
            header.header[m[1]] = m[2]
        elif kind == "raw" and named:
            _raw_edit(items, m)


# ----------------------------------------------------------------------------- checksums
def string_crc(data: bytes, count: int) -> int | None:
    """The masked CRC of a string tensor's bytes (docs/FORMAT.md), None if they do not parse."""
    if count > 1 << 20:
        return None
    pos, value = 0, 0
    try:
        for _ in range(count):
            n, pos = decode_varint(data, pos)
            value = crc.crc32c((n & 0xFFFFFFFF).to_bytes(4, "little"), value)
    except Exception:  # noqa: BLE001
        return None
    if pos + 4 > len(data):
        return None
    value = crc.crc32c(data[pos : pos + 4], value)
    return crc.mask(crc.crc32c(data[pos + 4 :], value))


def fix_entry_crcs(f: dict, data: bytes | None) -> None:
    """Recompute an entry's CRC32C and block CRCs from the bytes it points at."""
    start, size = f["offset"], f["size"]
    if data is None or not start >= 0 or not 0 <= size <= CRC_CAP or start + size > len(data):
        return
    body = data[start : start + size]
    whole = None
    if f["dtype"] == 7:
        count = math.prod(f["shape"]) if all(0 <= d < 1 << 31 for d in f["shape"]) else 1 << 40
        whole = string_crc(body, count)
    f["crc32c"] = whole if whole is not None else crc.masked_crc32c(body)
    bs = f["block_size"]
    if bs > 0:
        f["block_crcs"] = b"".join(
            encode_fixed32(crc.masked_crc32c(body[i : i + bs])) for i in range(0, len(body), bs)
        )


def data_name(shard: int, num_shards: int) -> str:
    return f"{PREFIX}.data-{shard:05d}-of-{num_shards:05d}"


# ----------------------------------------------------------------------------- bytes
def _block_handles(data: bytes) -> list[tuple[int, int]]:
    """The (offset, size) of every table block the footer and index block name."""
    footer = data[-table.FOOTER_SIZE :]
    meta_off, meta_size, pos = table._read_handle(footer, 0)
    index_off, index_size, _ = table._read_handle(footer, pos)
    handles = [(meta_off, meta_size)]
    contents = data[index_off : index_off + index_size]
    for _, handle in block.block_entries(memoryview(contents), "index block"):
        off, size, _ = table._read_handle(handle, 0)
        handles.append((off, size))
    return handles + [(index_off, index_size)]


def fix_table_checksums(data: bytearray) -> None:
    """Recompute the trailer CRC of every block the file still names (best effort)."""
    try:
        handles = _block_handles(bytes(data))
    except Exception:  # noqa: BLE001
        return
    for off, size in handles:
        end = off + size
        if off >= 0 and end + block.TRAILER_SIZE <= len(data):
            value = crc.mask(crc.crc32c(bytes(data[end : end + 1]), crc.crc32c(bytes(data[off:end]))))
            data[end + 1 : end + 5] = encode_fixed32(value)


def apply_byte_mutation(data: bytearray, m: list) -> None:
    _, region, pos, op, value = m
    if region == "block":
        try:
            handles = [h for h in _block_handles(bytes(data)) if h[1] > 0]
        except Exception:  # noqa: BLE001
            return
        off, size = handles[pos % len(handles)]
        at = off + (pos // len(handles)) % size
        if op == "set":
            data[at] = value & 0xFF
        else:
            data[at] ^= (value & 0xFF) or 1
        return
    if not data:
        return
    at = pos % len(data)
    if op == "flip":
        data[at] ^= (value & 0xFF) or 1
    elif op == "set":
        data[at] = value & 0xFF
    elif op == "insert":
        data[at:at] = bytes([value & 0xFF]) * (1 + abs(value) % 8)
    elif op == "delete":
        del data[at : at + 1 + abs(value) % 8]
    elif op == "truncate":
        del data[at:]


def apply_data_mutation(files: dict[str, bytearray], m: list) -> None:
    _, shard, op, a = m
    names = sorted(files)
    if not names:
        return
    data = files[names[shard % len(names)]]
    if op == "truncate":
        del data[abs(a) % (len(data) + 1) :]
    elif op == "extend":
        data += bytes(abs(a) % (1 << 20) + 1)
    elif op == "flip" and data:
        data[abs(a) % len(data)] ^= 0x5A


# ----------------------------------------------------------------------------- a case
class Built:
    """The files of one mutated case, in memory: the index and the data files by name."""

    def __init__(self, index: bytes, data: dict[str, bytes]):
        self.index = index
        self.data = data

    def write(self, directory: str, seed_dir: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, PREFIX + ".index"), "wb") as f:
            f.write(self.index)
        for name, data in self.data.items():
            src = os.path.join(seed_dir, name)
            dst = os.path.join(directory, name)
            if data is None:  # unchanged: a hard link (the worker only reads)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            else:
                with open(dst, "wb") as f:
                    f.write(data)


def build_case(case: dict, seed_index: bytes, seed_data: dict[str, bytes]) -> Built:
    """Apply a case's mutations to a seed (its index bytes and data files)."""
    files = {name: bytearray(data) for name, data in seed_data.items()}
    changed = set()
    for m in case["muts"]:
        if m[0] == "data":
            apply_data_mutation(files, m)
            changed = set(files)
    items = load_items(seed_index)
    apply_model_mutations(items, case["muts"])
    header = next(it for it in items if it.kind == "header").header
    if _renumber_shards(files, header["num_shards"]):
        changed = set(files)
    for m in case["muts"]:
        if m[0] == "strings" and _set_string_length(items, files, header["num_shards"], m):
            changed = set(files)
    if case["fix_crc"] != "none":
        for it in items:
            if (
                it.kind != "header"
                and it.fields is not None
                and it.raw is None
                and (case["fix_crc"] == "all" or it.touched)
            ):
                shard = it.fields["shard_id"]
                data = files.get(data_name(shard, header["num_shards"])) if 0 <= shard < 1 << 20 else None
                fix_entry_crcs(it.fields, None if data is None else bytes(data))
    pairs: dict[bytes, bytes] = {}
    for it in items:
        try:
            key = it.final_key()
        except Exception:  # noqa: BLE001  (an extent that OrderedCode cannot write)
            key = it.key
        pairs.setdefault(key, it.value())
    index = bytearray(table.build_table(sorted(pairs.items())))
    byte_muts = [m for m in case["muts"] if m[0] == "bytes"]
    for m in byte_muts:
        apply_byte_mutation(index, m)
    if byte_muts and case["fix_table"]:
        fix_table_checksums(index)
    return Built(bytes(index), {name: (bytes(files[name]) if name in changed else None) for name in files})


def _set_string_length(items: list[Item], files: dict[str, bytearray], num_shards: int, m: list) -> bool:
    _, which, element, length = m
    strings = [
        it for it in items if it.fields and it.raw is None and it.fields["dtype"] == 7 and it.fields["size"]
    ]
    if not strings:
        return False
    item = strings[which % len(strings)]
    f = item.fields
    data = files.get(data_name(f["shard_id"], num_shards)) if 0 <= f["shard_id"] < 1 << 20 else None
    count = math.prod(f["shape"]) if all(0 <= d < 1 << 20 for d in f["shape"]) else 0
    if data is None or not 0 < count <= 1 << 20 or not 0 <= f["offset"] <= len(data):
        return False
    body = bytes(data[f["offset"] : f["offset"] + f["size"]])
    lengths, pos = [], 0
    try:
        for _ in range(count):
            n, pos = decode_varint(body, pos)
            lengths.append(n)
    except Exception:  # noqa: BLE001
        return False
    lengths[element % count] = length & ((1 << 64) - 1)
    value = 0
    for n in lengths:
        value = crc.crc32c((n & 0xFFFFFFFF).to_bytes(4, "little"), value)
    encoded = b"".join(map(varint, lengths)) + encode_fixed32(crc.mask(value)) + body[pos + 4 :]
    f["offset"], f["size"] = len(data), len(encoded)
    data += encoded
    item.touched = True
    return True


def _renumber_shards(files: dict[str, bytearray], num_shards: int) -> bool:
    """After a header edit to 2..8 shards, name the data file as its shard 0 and add empty
    files for the others (so shard ids that point at them reach the readers)."""
    if not 2 <= num_shards <= 8 or len(files) != 1:
        return False
    (data,) = files.values()
    files.clear()
    files[data_name(0, num_shards)] = data
    for shard in range(1, num_shards):
        files[data_name(shard, num_shards)] = bytearray()
    return True


# ----------------------------------------------------------------------------- strategies
SPECIAL_INTS = (
    0,
    1,
    2,
    3,
    7,
    14,
    17,
    24,
    25,
    26,
    99,
    255,
    1000,
    -1,
    -2,
    65535,
    65536,
    65537,
    1 << 20,
    1 << 24,
    10**8,
    (1 << 30),
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    (1 << 62),
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    1 << 64,
    1 << 70,
    -(1 << 63),
)


def ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(-300, 300), st.integers(-(1 << 64), 1 << 65))


small = st.integers(0, 1000)


def entry_mutations() -> st.SearchStrategy[list]:
    scalar = st.tuples(
        st.just("entry"),
        small,
        st.sampled_from(INT_FIELDS),
        st.sampled_from(("set", "set", "add", "mul")),
        ints(),
        small,
        small,
    )
    shape = st.tuples(
        st.just("entry"),
        small,
        st.just("shape"),
        st.sampled_from(("set_dim", "append", "drop", "rank")),
        ints(),
        small,
        small,
    )
    slices = st.tuples(
        st.just("entry"),
        small,
        st.just("slices"),
        st.sampled_from(("set_start", "set_length", "add_dim", "drop_dim", "dup", "drop", "whole")),
        ints(),
        small,
        small,
    )
    crcs = st.tuples(
        st.just("entry"),
        small,
        st.just("block_crcs"),
        st.sampled_from(("truncate", "append", "flip")),
        ints(),
        small,
        small,
    )
    return st.one_of(scalar, shape, slices, crcs).map(list)


def mutations() -> st.SearchStrategy[list]:
    piece = st.tuples(st.just("piece"), small, small, ints(), ints(), st.booleans()).map(list)
    key = st.tuples(st.just("key"), small, st.sampled_from(("non_utf8", "suffix", "copy")), ints()).map(list)
    header = st.tuples(
        st.just("header"), st.sampled_from(("num_shards", "endianness", "producer", "min_consumer")), ints()
    ).map(list)
    raw = st.tuples(
        st.just("raw"), small, st.sampled_from(("unknown_field", "wrong_wire", "twice", "truncate")), ints()
    ).map(list)
    byte = st.tuples(
        st.just("bytes"),
        st.sampled_from(("block", "block", "any")),
        st.integers(0, 1 << 16),
        st.sampled_from(("flip", "set", "insert", "delete", "truncate")),
        st.integers(0, 255),
    ).map(list)
    data = st.tuples(st.just("data"), small, st.sampled_from(("truncate", "extend", "flip")), ints()).map(
        list
    )
    return st.one_of(entry_mutations(), entry_mutations(), piece, key, header, raw, byte, data)


def cases() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {
            "seed": st.sampled_from(SEED_NAMES),
            "muts": st.lists(mutations(), min_size=1, max_size=4),
            "fix_table": st.sampled_from((True, True, True, False)),
            "fix_crc": st.sampled_from(("touched", "touched", "all", "none")),
        }
    )
