"""The pieces of a many-piece tensor that one rank's block needs, found without decoding
the others (a row-sharded tensor saved by ten thousand ranks has ten thousand pieces;
each rank restoring its rows needs one or two of them).

Slice keys sort by name, rank, then each dimension's start and length as increasing
numbers, so the pieces starting in a range of rows are a range of keys: a binary search
over the table's index block and a block's restart points finds them (Pieces.starting_in).
For the block of rows ``[a, b)`` the candidates are the pieces starting in ``[s, b)``,
``s`` the greatest start at or below ``a``; while the candidates that overlap the block
do not cover it, ``s`` steps back to the previous start (pieces cut along other dimensions
too may begin above ``a``'s start and still reach ``a``).

What is checked, and why that keeps the hostile-file promise (checks.py, DESIGN.md):
every piece used gets exactly the checks ``checked_pieces`` makes of each piece (known
dtype, the tensor's dtype and rank, extents inside the shape and equal to the entry's
shape, as many bytes as its elements need, checksum blocks that fit them, inside its
data file); the pieces overlapping the block are disjoint and together hold exactly its
elements; each is listed in the full entry's ``slices``; every key and entry decoded comes
from a table block whose checksum was verified, through runs that are bounds-checked and
strictly increasing. So every byte a restore uses is verified, and damage in what it uses
is a DataLossError before a byte of data is read or a buffer allocated: sizes are checked
before use exactly as before. What is not looked at: pieces that overlap none of the
block, and the list itself, which is searched for the records of the pieces used but not
framed (so neither entries no key holds nor a field among the records, which TF's
protobuf parse would read, are seen). A crafted index can therefore put two pieces over
one region when only one of them meets the block, or a stray piece away from it: the
block restores the elements the pieces it uses define, with checksums matching. A
whole-tensor read, or a tensor of fewer than LOOKUP_MIN_PIECES slice keys (counted from
the keys, so a padded list does not pass for many pieces), still gets every check.
"""

from __future__ import annotations

from ..errors import DataLossError
from ..format.coding import DecodeError
from ..format.entry import BundleEntry, slice_field
from ..format.index import Index, entry_problem
from ..format.slices import RawSlices
from ..plan import Block
from .checks import (
    DataFiles,
    _check_disjoint,
    _explain_piece,
    _fits,
    check_shape,
    check_stored_entry,
    stored_dtype,
)

LOOKUP_MIN_PIECES = 6
"""A tensor of fewer slice keys is checked whole: every check applies to every piece and
to its full entry's whole list. Measured (issue 15): a lookup costs ~0.2 ms a tensor
whatever its pieces, a whole check ~28 us a piece, so from six to eight pieces on the
lookup is cheaper, and a restore's work per rank stops growing with the number of ranks
that saved (it was the whole index's pieces: 80 tensors x 16 pieces, 38 ms a rank,
against 19 ms by lookup)."""

LOOKUP_MIN_SLICE_BYTES = 64
"""A full entry whose ``slices`` records take fewer bytes (fewer than six pieces of a
matrix, 10-16 bytes a record) is checked whole without counting its keys."""


def wants_lookup(index: Index, name: str, block: Block) -> bool:
    """Whether to find the pieces of ``name`` that ``block`` needs by binary search,
    rather than decoding and checking all of them. Decided by the number of slice keys,
    not by the list's length alone: a crafted full entry of two pieces whose list is
    padded past the threshold (a fuzz finding) is checked whole, so its list is framed."""
    if name not in index.pieces or not block.shape or block.shape == index.entries[name].shape:
        return False
    listed = index.pieces.listed(name)
    if not isinstance(listed, RawSlices) or listed.raw_len() < LOOKUP_MIN_SLICE_BYTES:
        return False
    try:
        return index.pieces.more_than(name, LOOKUP_MIN_PIECES - 1)
    except DecodeError:  # damage near the keys: the whole check finds and names it
        return False


def pieces_for(
    prefix, index: Index, name: str, block: Block, files: DataFiles
) -> tuple[BundleEntry, list[tuple[Block, BundleEntry]]]:
    """The full entry of ``name`` and the pieces overlapping ``block``, as ``(piece,
    entry)``, checked as the module docstring says. DataLossError on damage."""
    full = index.entries[name]
    dtype = stored_dtype(prefix, name, full.dtype)
    check_shape(prefix, name, full.shape)
    rank = len(full.shape)
    a, b = block.offset[0], block.offset[0] + block.shape[0]
    try:
        start = index.pieces.start_before(name, rank, a + 1)
        found = index.pieces.starting_in(name, rank, start, b)
        used = _overlapping(prefix, name, full, found, block)
        while sum(inter.size for *_, inter in used) < block.size and start is not None:
            previous = index.pieces.start_before(name, rank, start)
            more = index.pieces.starting_in(name, rank, previous, start)
            used = _overlapping(prefix, name, full, more, block) + used
            start = previous
        raw = index.pieces.listed(name).raw()
    except DecodeError as exc:
        raise DataLossError(f"{prefix.url}.index is damaged: {exc}") from exc
    _check_disjoint(prefix, name, [piece for _, piece, _, _ in used])
    for extents, piece, entry, _ in used:
        check_stored_entry(prefix, name, entry, piece, dtype, files)
        if slice_field(extents) not in raw:
            raise DataLossError(
                f"{prefix.url}.index: tensor {name!r}: field slices: piece {list(extents)} "
                "is not among the slices its entry lists"
            )
    return full, [(piece, entry) for _, piece, entry, _ in used]


def _overlapping(prefix, name: str, full: BundleEntry, found, block: Block) -> list:
    """Of ``found`` (extents, encoded entry), the pieces that overlap ``block``, decoded
    and fitted to the tensor: ``(extents, piece, entry, intersection)``."""
    out = []
    for extents, value in found:
        entry = BundleEntry.decode(value)
        problem = entry_problem(entry)
        if problem:
            raise DecodeError(f"a piece of tensor {name!r}: {problem}")
        if not (entry.dtype == full.dtype and _fits(extents, entry.shape, full.shape)):
            _explain_piece(prefix, name, full, extents, entry)
        piece = Block(tuple(start for start, _ in extents), entry.shape)
        inter = piece.intersect(block)
        if inter is not None and inter.size:
            out.append((extents, piece, entry, inter))
    return out


__all__ = ["LOOKUP_MIN_PIECES", "LOOKUP_MIN_SLICE_BYTES", "pieces_for", "wants_lookup"]
