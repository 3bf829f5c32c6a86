"""Checks of a hostile index: every field a restore will use, before a byte is read.

An index may say anything (a crafted or damaged file): a dtype no reader knows, a shape no
array can have, pieces that overlap or leave holes, an entry past the end of its data
file, checksum blocks of any size. Each is a DataLossError naming the index and the
tensor here, so that the planner and the loads after it can fail only on the bytes read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np

from .. import storage
from ..errors import DataLossError, NotFoundError
from ..format import dtypes
from ..format.coding import DecodeError
from ..format.entry import BundleEntry
from ..format.index import Index
from ..format.names import data_file_name
from ..plan import Block

MAX_BLOCK_SIZE = 16 << 20
"""The largest checksum block a reader accepts (shardsave writes 64 KiB): each read
thread holds one block at a time, so a crafted size must not make that a GiB."""


class DataFiles:
    """The sizes of a checkpoint's data files, each looked up once (a stat; a HEAD request
    on an object store), so that every entry can be checked to lie inside its file before
    anything is allocated or read."""

    def __init__(self, prefix: storage.Location, index: Index):
        self.prefix = prefix
        self.index = index
        self._sizes: dict[int, int] = {}

    def size(self, shard_id: int, name: str) -> int:
        found = self._sizes.get(shard_id)
        if found is None:
            loc = shard_file(self.prefix, self.index, shard_id, name)
            found = storage.size(loc)
            if found is None:
                raise NotFoundError(f"reading {loc.url}: not found (the data file of tensor {name!r})")
            self._sizes[shard_id] = found
        return found

    def holds(self, entry: BundleEntry) -> bool:
        """Whether the entry's bytes lie inside its data file, if its size is known already."""
        size = self._sizes.get(entry.shard_id)
        return size is not None and entry.offset + entry.size <= size

    def check(self, name: str, entry: BundleEntry) -> None:
        """The entry's bytes lie inside its data file."""
        if entry.offset + entry.size > self.size(entry.shard_id, name):
            loc = shard_file(self.prefix, self.index, entry.shard_id, name)
            raise DataLossError(
                f"{loc.url}: file too short for tensor {name!r}, stored at offset {entry.offset}, "
                f"{entry.size} bytes: past the end of the file ({self.size(entry.shard_id, name)} bytes)"
            )


def stored_dtype(prefix: storage.Location | str, name: str, tf_type: int) -> np.dtype:
    """The numpy dtype of a tensor's DataType; DataLossError if shardsave knows no such type."""
    try:
        return dtypes.to_numpy(tf_type)
    except ValueError:
        raise DataLossError(
            f"{_url(prefix)}.index: tensor {name!r} has dtype {tf_type}, "
            "which is no DataType shardsave can read"
        ) from None


def shape_ok(shape: tuple[int, ...]) -> bool:
    """Whether numpy can make an array of this shape (the index may say anything)."""
    return (
        len(shape) <= MAX_RANK
        and all(d >= 0 for d in shape)
        and math.prod(d for d in shape if d) <= MAX_ELEMENTS
    )


def check_shape(prefix: storage.Location | str, name: str, shape: tuple[int, ...]) -> None:
    """DataLossError unless ``shape_ok``."""
    if not shape_ok(shape):
        raise DataLossError(
            f"{_url(prefix)}.index: tensor {name!r} has shape {list(shape)}, which no array "
            f"can have (at most {MAX_RANK} dimensions, none negative, {MAX_ELEMENTS} elements)"
        )


def _url(prefix: storage.Location | str) -> str:
    return prefix if isinstance(prefix, str) else prefix.url


MAX_RANK = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
"""numpy's limit on dimensions (TF's is 254)."""
MAX_ELEMENTS = 1 << 59
"""More elements than this (the non-zero dimensions' product) no array can hold: numpy
needs ``elements x itemsize`` (up to 16 bytes) to fit in 63 bits."""


def checked_pieces(
    prefix: storage.Location, index: Index, name: str, files: DataFiles
) -> tuple[BundleEntry, list[tuple[Block, BundleEntry]]]:
    """The full entry of ``name`` and its pieces (one whole piece for a plain tensor), as
    ``(piece, entry)``, every piece checked against its tensor before a byte is read:
    a known dtype, the tensor's dtype and rank, an extent inside its shape, as many bytes
    as its elements need (and checksum blocks that fit them), inside its data file.

    After this, reading and placing the pieces can fail only on the bytes read (checksums,
    I/O): the second pass of an in-place restore cannot meet anything it did not check."""
    full = index.entries[name]
    dtype = stored_dtype(prefix, name, full.dtype)
    check_shape(prefix, name, full.shape)
    if name not in index.pieces:
        check_stored_entry(prefix, name, full, Block.whole(full.shape), dtype, files)
        return full, [(Block.whole(full.shape), full)]
    pieces = []
    shape, rank, itemsize = full.shape, len(full.shape), dtype.itemsize
    plain = full.dtype != dtypes.DT_STRING
    for extents, entry in index.pieces[
        name
    ].items():  # a million pieces may be checked: the common case inline
        piece = Block(tuple([start for start, _ in extents]), entry.shape)
        if not (entry.dtype == full.dtype and len(extents) == rank and _fits(extents, entry.shape, shape)):
            _explain_piece(prefix, name, full, extents, entry)
        if not (
            plain
            and entry.size == math.prod(entry.shape) * itemsize
            and not entry.block_size
            and not entry.block_crcs
            and files.holds(entry)
        ):
            check_stored_entry(prefix, name, entry, piece, dtype, files)
        pieces.append((piece, entry))
    _check_disjoint(prefix, name, [piece for piece, _ in pieces])
    _check_covered(prefix, name, full, pieces, index.pieces[name])
    return full, pieces


def _check_covered(
    prefix: storage.Location, name: str, full: BundleEntry, pieces: list[tuple[Block, BundleEntry]], keys
) -> None:
    """The (disjoint) pieces tile the whole tensor, and their keys are exactly the slices
    its full entry lists (TensorFlow finds a tensor's pieces through that list): as every
    writer stores them. Else a read would return elements no piece holds."""
    where = f"{prefix.url}.index: tensor {name!r}"
    covered, total = sum(math.prod(piece.shape) for piece, _ in pieces), math.prod(full.shape)
    if covered != total:
        raise DataLossError(f"{where}: field slices: its pieces hold {covered} of its {total} elements")
    try:
        listed = {tuple(map(tuple, extents)) for extents in full.slices}
    except (DecodeError, ValueError, IndexError, OverflowError) as exc:
        raise DataLossError(f"{where}: field slices do not decode: {exc}") from None
    if listed != {tuple(map(tuple, extents)) for extents in keys}:
        raise DataLossError(
            f"{where}: field slices: the slices its entry lists are not the pieces the index holds"
        )


def _fits(extents, piece_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Extents ``(start, length)`` (length -1: the whole dimension) inside ``shape``, and
    ``piece_shape`` is their lengths."""
    if not len(extents) == len(piece_shape) == len(shape):
        return False
    return all(
        n >= 0 and start >= 0 and start + n <= d and (length == n or (length == -1 and start == 0 and n == d))
        for (start, length), n, d in zip(extents, piece_shape, shape, strict=True)
    )


def _check_disjoint(prefix: storage.Location, name: str, pieces: list[Block]) -> None:
    """No two pieces share an element (else a region is stored twice and another not at
    all, and the covered count of a restore would not see it).

    Pieces are sorted along the dimension where their starts differ most, and only those
    that overlap in it are compared: no pair at all for pieces cut along one dimension,
    a row of a grid for pieces cut along two."""
    pieces = [p for p in pieces if p.size]
    if len(pieces) < 2 or not pieces[0].shape:
        return
    lo = np.array([p.offset for p in pieces], np.int64)
    hi = lo + np.array([p.shape for p in pieces], np.int64)
    dim = max(range(lo.shape[1]), key=lambda d: len(np.unique(lo[:, d])))
    order = np.argsort(lo[:, dim], kind="stable")
    lo, hi = lo[order], hi[order]
    stop = np.searchsorted(lo[:, dim], hi[:, dim], "left")  # j < stop[i]: j starts before i ends
    counts = np.maximum(stop - np.arange(len(lo)) - 1, 0)
    if not counts.any():
        return
    first = np.repeat(np.arange(len(lo)), counts)
    second = first + 1 + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    overlap = ((lo[first] < hi[second]) & (lo[second] < hi[first])).all(axis=1)
    if overlap.any():
        k = int(np.flatnonzero(overlap)[0])
        a, b = (pieces[int(order[i])] for i in (first[k], second[k]))
        raise DataLossError(
            f"{prefix.url}.index: pieces {list(a.extents())} and {list(b.extents())} "
            f"of tensor {name!r} overlap"
        )


def _explain_piece(
    prefix: storage.Location, name: str, full: BundleEntry, extents, entry: BundleEntry
) -> None:
    """Raise the DataLossError that says why a piece does not fit its tensor."""
    where = f"{prefix.url}.index: piece {list(extents)} of tensor {name!r}"
    if entry.dtype != full.dtype:
        raise DataLossError(
            f"{where} has dtype {dtypes.tf_name(entry.dtype)}, its tensor {dtypes.tf_name(full.dtype)}"
        )
    if len(extents) != len(full.shape):
        raise DataLossError(f"{where} has rank {len(extents)}, its tensor's shape is {list(full.shape)}")
    for (start, length), dim in zip(extents, full.shape, strict=True):
        if not (length == -1 and start == 0) and not (start >= 0 and length >= 0 and start + length <= dim):
            raise DataLossError(f"{where} does not lie inside the tensor's shape {list(full.shape)}")
    piece = Block.from_extents(extents, full.shape)
    raise DataLossError(f"{where} has shape {list(entry.shape)}, its extents say {list(piece.shape)}")


def check_stored_entry(
    prefix: storage.Location, name: str, entry: BundleEntry, piece: Block, dtype: np.dtype, files: DataFiles
) -> None:
    """The entry holding ``piece`` of tensor ``name`` has the bytes its elements need,
    checksum blocks that fit them, and lies inside its data file."""
    check_entry_size(prefix, name, entry, piece, dtype)
    check_block_crcs(prefix, name, entry)
    files.check(name, entry)


@contextlib.contextmanager
def index_damage(prefix: storage.Location) -> Iterator[None]:
    """Turn a DecodeError (of slice entries, decoded on first use) into a DataLossError."""
    try:
        yield
    except DecodeError as exc:
        raise DataLossError(f"{prefix.url}.index is damaged: {exc}") from exc


def shard_file(prefix: storage.Location, index: Index, shard_id: int, name: str) -> storage.Location:
    """The data file of ``shard_id``, which tensor ``name``'s entry points at."""
    num_shards = index.header.num_shards
    if shard_id >= num_shards:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} is in shard {shard_id}, "
            f"but the checkpoint has {num_shards} shard(s)"
        )
    return prefix.with_path(data_file_name(prefix.path, shard_id, num_shards))


def check_entry_size(prefix, name: str, entry: BundleEntry, piece: Block, dtype: np.dtype) -> None:
    if entry.dtype == dtypes.DT_STRING:  # a varint length of at least a byte per element, and a CRC
        if piece.size and entry.size < piece.size + 4:
            raise DataLossError(
                f"{prefix.url}.index: string tensor {name!r} has {entry.size} bytes stored, too few "
                f"for the {piece.size} elements of its shape {list(piece.shape)} (at least {piece.size + 4})"
            )
        return
    expected = piece.size * dtype.itemsize
    if entry.size != expected:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} has {entry.size} bytes stored, its shape "
            f"{list(piece.shape)} of {dtype} needs {expected}"
        )


def check_block_crcs(prefix, name: str, entry: BundleEntry) -> None:
    if not (entry.block_size or entry.block_crcs):
        return
    if not 0 < entry.block_size <= MAX_BLOCK_SIZE:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} has a crc32c_block_size of {entry.block_size} bytes, "
            f"outside 1..{MAX_BLOCK_SIZE}"
        )
    want = 4 * -(-entry.size // entry.block_size)
    if len(entry.block_crcs) != want:
        raise DataLossError(
            f"{prefix.url}.index: tensor {name!r} has {len(entry.block_crcs)} bytes of block checksums, "
            f"{want} expected for {entry.size} bytes in blocks of {entry.block_size}"
        )
