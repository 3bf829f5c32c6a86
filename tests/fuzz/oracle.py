"""What a successful read of a mutated checkpoint must give: an independent reference.

For every tensor name the index holds, either ``("ok", array)``: the value the entries
and the bytes in the data files define (each piece's bytes at its place; every checksum
the entry carries agrees with those bytes, or its block CRCs all do), or ``("bad",
reason)``: the index does not define one (a piece of another dtype, a gap or overlap,
bytes outside the file, a checksum that does not match...). A read that succeeds must
return the "ok" value; a read that succeeds on a "bad" name is a finding.

The reference is built in the parent process with plain numpy and its own checks; it
uses shardsave.format only for the table and the protobuf fields, which it takes as
they are (no validation of shardsave's is relied upon).
"""

from __future__ import annotations

import math

import numpy as np

from shardsave.format import crc, dtypes, table
from shardsave.format.coding import decode_varint
from shardsave.format.entry import BundleEntry
from shardsave.format.index import BundleHeader

from .mutate import data_name, parse_slice_key, string_crc

MAX_ELEMENTS = 1 << 24  # the seeds' tensors are far smaller; a larger claim is "bad"


class Bad(Exception):
    pass


def _check(cond: bool, reason: str) -> None:
    if not cond:
        raise Bad(reason)


def _numpy_dtype(tf_type: int) -> np.dtype:
    try:
        return dtypes.to_numpy(tf_type)
    except ValueError:
        raise Bad(f"unknown dtype {tf_type}") from None


def _checked_shape(shape) -> tuple[int, ...]:
    _check(len(shape) <= 64, f"rank {len(shape)}")  # numpy's limit (TF's is 254)
    _check(all(0 <= d < 1 << 62 for d in shape), f"bad dimension in {list(shape)}")
    _check(math.prod(shape) <= MAX_ELEMENTS, f"{math.prod(shape)} elements")
    return tuple(shape)


def _decode_strings(body: bytes, count: int) -> np.ndarray:
    pos, lengths = 0, []
    for _ in range(count):
        try:
            n, pos = decode_varint(body, pos)
        except Exception:  # noqa: BLE001
            raise Bad("string lengths do not parse") from None
        lengths.append(n)
    _check(pos + 4 + sum(lengths) == len(body), "string lengths disagree with the entry size")
    out = np.empty(count, object)
    pos += 4
    for i, n in enumerate(lengths):
        out[i] = body[pos : pos + n]
        pos += n
    return out


def _blocks_agree(e: BundleEntry, body: bytes) -> bool:
    bs = e.block_size
    if not 0 < bs <= len(body) + bs or e.size == 0:
        return False
    count = -(-len(body) // bs)
    if len(e.block_crcs) != 4 * count:
        return False
    return all(
        int.from_bytes(e.block_crcs[4 * i : 4 * i + 4], "little")
        == crc.masked_crc32c(body[i * bs : (i + 1) * bs])
        for i in range(count)
    )


def _value(
    e: BundleEntry, shape: tuple[int, ...], header: BundleHeader, files: dict[str, bytes]
) -> np.ndarray:
    """The tensor one (plain or piece) entry defines."""
    dt = _numpy_dtype(e.dtype)
    if math.prod(shape) == 0:  # nothing to read: the only value there is, whatever the rest says
        return np.empty(shape, dt)
    _check(0 <= e.shard_id < header.num_shards, f"shard {e.shard_id} of {header.num_shards}")
    data = files.get(data_name(e.shard_id, header.num_shards))
    _check(data is not None, "no such data file")
    # no bytes to read: where they would start does not matter
    _check(
        e.size == 0 or e.offset + e.size <= len(data),
        f"bytes {e.offset}+{e.size} past the {len(data)}-byte file",
    )
    body = data[e.offset : e.offset + e.size]
    count = math.prod(shape)
    if dt.hasobject:
        whole = string_crc(body, count)
        _check(whole == e.crc32c or _blocks_agree(e, body), "string checksum does not match")
        return _decode_strings(body, count).reshape(shape)
    _check(e.size == count * dt.itemsize, f"size {e.size} for {count} x {dt.itemsize} bytes")
    _check(crc.masked_crc32c(body) == e.crc32c or _blocks_agree(e, body), "checksum does not match")
    return np.frombuffer(body, dt).reshape(shape).copy()


def _extent(d: int, start: int, length: int, dim: int) -> tuple[int, int]:
    if (start, length) == (0, -1):
        return 0, dim
    _check(
        start >= 0 and length >= 0 and start + length <= dim,
        f"extent {(start, length)} outside dimension {d}",
    )
    return start, length


def _sliced(name: str, e: BundleEntry, pieces: dict, header, files) -> np.ndarray:
    dt = _numpy_dtype(e.dtype)
    shape = _checked_shape(e.shape)
    if math.prod(shape) == 0:  # as for a plain entry: an empty tensor needs no piece
        return np.empty(shape, dt)
    out = np.empty(shape, dt)
    count = np.zeros(shape, np.int32)
    try:
        slices = list(e.slices)
    except Exception as exc:  # noqa: BLE001
        raise Bad(f"slices do not decode: {exc}") from None
    for sl in slices:
        _check(len(sl) == len(shape), f"slice of rank {len(sl)} for shape {list(shape)}")
        region = tuple(_extent(d, s, n, dim) for d, ((s, n), dim) in enumerate(zip(sl, shape, strict=True)))
        piece = pieces.get(tuple(map(tuple, sl)))
        _check(piece is not None, f"piece {sl} missing")
        _check(piece.dtype == e.dtype, f"piece dtype {piece.dtype} of a {e.dtype} tensor")
        piece_shape = tuple(n for _, n in region)
        _check(tuple(piece.shape) == piece_shape, f"piece shape {list(piece.shape)} for extent {sl}")
        index = tuple(slice(s, s + n) for s, n in region)
        out[index] = _value(piece, piece_shape, header, files)
        count[index] += 1
    _check(bool((count == 1).all()), "pieces overlap or leave a gap")
    return out


def reference(index: bytes, files: dict[str, bytes]) -> dict[str, tuple[str, object]] | None:
    """``{name: ("ok", array) | ("bad", reason)}``; None when the table does not parse."""
    try:
        items = table.read_table(index)
        header = BundleHeader.decode(bytes(items[0][1])) if items and items[0][0] == b"" else None
    except Exception:  # noqa: BLE001
        return None
    if header is None:
        return None
    pieces: dict[str, dict] = {}
    entries: dict[str, BundleEntry | None] = {}
    for key, value in items[1:]:
        try:
            entry = BundleEntry.decode(bytes(value))
        except Exception:  # noqa: BLE001
            entry = None
        if key[:1] == b"\x00":
            parsed = parse_slice_key(key)
            if parsed is not None and entry is not None:
                name = parsed[0].decode("utf-8", "surrogateescape")
                pieces.setdefault(name, {})[tuple(map(tuple, parsed[1]))] = entry
            continue
        entries[key.decode("utf-8", "surrogateescape")] = entry
    out: dict[str, tuple[str, object]] = {}
    for name, e in entries.items():
        try:
            _check(e is not None, "entry does not decode")
            _check(header.endianness == 0 and header.min_consumer <= 1, "header")
            if e.slices:
                out[name] = ("ok", _sliced(name, e, pieces.get(name, {}), header, files))
            else:
                out[name] = ("ok", _value(e, _checked_shape(e.shape), header, files))
        except Bad as exc:
            out[name] = ("bad", str(exc))
    return out
