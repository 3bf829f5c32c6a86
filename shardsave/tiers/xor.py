"""XOR parity across an XOR set (pure numpy), SCR's distributed layout.

A set has ``G`` members (ascending saving ranks, one per node). Each member's data file,
padded with zeros, is cut into ``G - 1`` chunks of ``c = manifest.chunk_size(sizes)``
bytes. Member ``m`` puts its chunk ``k`` in slot ``d`` (``d != m``; ``k = d`` if ``d < m``
else ``d - 1``) and zeros in its own slot; a reduce-scatter with XOR gives member ``d``
the parity ``P_d``, the XOR of every other member's chunk for slot ``d``. Every member
stores ``c`` bytes, ``1/(G-1)`` of a file, and no member's parity covers its own data.

A lost member ``x``'s chunk ``k`` went to slot ``d = k if k < x else k + 1``; it is
``P_d`` XOR the chunks for slot ``d`` of the members other than ``x`` and ``d``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import DataLossError
from .manifest import Manifest


def chunk_of(pos: int, slot: int) -> int:
    """Which of member ``pos``'s chunks goes to ``slot`` (``slot != pos``)."""
    return slot if slot < pos else slot - 1


def slot_of(pos: int, chunk: int) -> int:
    """Which slot (member) holds the parity of member ``pos``'s ``chunk``."""
    return chunk if chunk < pos else chunk + 1


def padded(data, count: int, c: int) -> np.ndarray:
    """``data`` as ``count`` chunks of ``c`` bytes, zero-padded: shape (count, c)."""
    raw = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    out = np.zeros(count * c, np.uint8)
    out[: len(raw)] = raw
    return out.reshape(count, c)


def slots(
    data, pos: int, members: int, c: int, lo: int = 0, hi: int | None = None, width: int | None = None
) -> np.ndarray:
    """Member ``pos``'s contribution to the reduce-scatter: for every slot, bytes ``[lo,
    hi)`` (default the whole ``c``) of the chunk it puts there (zeros in its own slot and
    past the end of its file), each slot zero-padded to ``width`` bytes; flat."""
    hi = c if hi is None else hi
    width = hi - lo if width is None else width
    view = memoryview(data).cast("B")
    raw = np.frombuffer(view, np.uint8) if len(view) else np.zeros(0, np.uint8)
    out = np.zeros((members, width), np.uint8)
    for slot in range(members):
        if slot != pos:
            k = chunk_of(pos, slot)
            piece = raw[k * c + lo : k * c + hi]
            out[slot, : len(piece)] = piece
    return out.reshape(-1)


def parity(datas: list, c: int) -> list[np.ndarray]:
    """Every member's parity chunk, computed in one place (what the reduce-scatter gives)."""
    total = np.zeros(len(datas) * c, np.uint8)
    for pos, data in enumerate(datas):
        total ^= slots(data, pos, len(datas), c)
    return list(total.reshape(len(datas), c))


def rebuild(manifest: Manifest, lost: int, read: Callable[[str, int], object]) -> bytes:
    """The data file of saving rank ``lost`` from its XOR set's other members:
    ``read("data", r)`` (their data files, or partner copies) and ``read("parity", r)``
    (their parity chunks). Every length is checked against the manifest before use; the
    caller still checks the result against the index's CRCs."""
    if manifest.sets is None or manifest.chunks is None:
        raise DataLossError(f"step {manifest.step}: saved without XOR parity, rank {lost} cannot be rebuilt")
    which = next(i for i, s in enumerate(manifest.sets) if lost in s)
    members, c = manifest.sets[which], manifest.chunks[which]
    x = members.index(lost)
    out = np.zeros((len(members) - 1, c), np.uint8)
    for pos, rank in enumerate(members):
        if pos == x:
            continue
        data = _exact(read("data", rank), manifest.sizes[rank], "data file", rank, manifest)
        par = _exact(read("parity", rank), c, "parity", rank, manifest)
        chunks = padded(data, len(members) - 1, c)
        # rank holds the parity of slot `pos`: x's chunk chunk_of(x, pos) is in it
        out[chunk_of(x, pos)] ^= np.frombuffer(par, np.uint8)
        for slot in range(len(members)):
            if slot not in (pos, x):  # its chunk for slot went into P_slot
                out[chunk_of(x, slot)] ^= chunks[chunk_of(pos, slot)]
    return out.reshape(-1)[: manifest.sizes[lost]].tobytes()


def _exact(data, size: int, kind: str, rank: int, manifest: Manifest) -> memoryview:
    view = memoryview(data).cast("B")
    if len(view) != size:
        raise DataLossError(
            f"step {manifest.step}: the {kind} of rank {rank} has {len(view)} bytes, the manifest says {size}"
        )
    return view
