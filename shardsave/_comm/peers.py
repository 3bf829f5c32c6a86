"""Bytes between ranks, sub-communicators and XOR reductions: what the fast tier (tiers/),
the gathering writers of ``files_per_node`` and the index broadcast need, in the comm room.

Every wait here is bounded by the Comm's ``timeout``: a peer that never sends costs
``DeadlineExceededError`` naming it, not a hang. Buffers travel as raw bytes (never
pickled), in pieces below MPI's 2**31-element count limit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import errors
from . import SPIN, Comm, _duplicate, _poll, _wait_or_break

PIECE = 1 << 30
"""Largest message: MPI counts are 32-bit ints in the classic bindings."""
STREAM_TAG = 0x5A511


def pieces(view: memoryview) -> list[memoryview]:
    return [view[i : i + PIECE] for i in range(0, len(view), PIECE)] or [view[:0]]


STREAM_PIECE = 16 << 20
"""What :func:`stream` receives at a time (two such buffers per rank)."""


def stream(
    comm: Comm,
    sends: Mapping[int, Any],
    recvs: Mapping[int, tuple[int, Callable[[memoryview], None]]],
    what: str,
    tag: int = STREAM_TAG,
) -> None:
    """Send each ``sends[rank]`` (a bytes-like buffer) to ``rank``, straight from it (a
    mapped file), and receive ``recvs[rank] = (size, sink)``: exactly ``size`` bytes from
    ``rank``, a piece at a time into one of two reused buffers, each handed to ``sink``
    (a file's write) while the next arrives. Memory stays at two pieces, and no fresh
    buffer of a whole file is faulted in. Both sides must agree on the sizes (the
    caller's plan). Bounded by ``comm.timeout``."""
    if comm._comm is None:
        for rank, buf in sends.items():
            view = memoryview(buf).cast("B")
            for lo in range(0, len(view), STREAM_PIECE):
                recvs[rank][1](view[lo : lo + STREAM_PIECE])
        return
    from mpi4py import MPI

    mpi = comm._usable(what)
    deadline = None if comm.timeout is None else time.monotonic() + comm.timeout
    outgoing = [
        mpi.Isend([view[lo : lo + STREAM_PIECE], MPI.BYTE], dest=rank, tag=tag)
        for rank, buf in sends.items()
        for view in [memoryview(buf).cast("B")]
        for lo in range(0, len(view), STREAM_PIECE)
    ]
    buffers = [np.empty(STREAM_PIECE, np.uint8), np.empty(STREAM_PIECE, np.uint8)]

    def wait(requests: list, peers: list) -> None:
        if not _poll(lambda: MPI.Request.Testall(requests), deadline):
            for req in requests + outgoing:
                req.Cancel()
            raise errors.DeadlineExceededError(
                f"{what}: rank {comm.rank} exchanged no bytes with ranks {peers} within {comm.timeout:g} s"
            )

    for rank, (size, sink) in recvs.items():
        pieces = [(lo, min(STREAM_PIECE, size - lo)) for lo in range(0, size, STREAM_PIECE)]
        pending = None
        for i, (_, n) in enumerate(pieces):
            view = memoryview(buffers[i % 2])[:n]
            req = mpi.Irecv([view, MPI.BYTE], source=rank, tag=tag)
            if pending is not None:  # write the last piece while this one arrives
                sink(pending)
            wait([req], [rank])
            pending = view
        if pending is not None:
            sink(pending)
    wait(outgoing, sorted(sends))


def bcast_bytes(comm: Comm, buf: Any, what: str, root: int = 0) -> None:
    """``buf`` of rank ``root`` into ``buf`` of every other rank (the same size on every
    rank), raw, in pieces below MPI's count limit. Bounded by ``comm.timeout``: a rank
    that never arrives costs DeadlineExceededError, and the Comm is unusable after it (a
    collective cannot be cancelled)."""
    if comm._comm is None:
        return
    from mpi4py import MPI

    mpi = comm._usable(what)
    view = memoryview(buf).cast("B")
    requests = [mpi.Ibcast([piece, MPI.BYTE], root=root) for piece in pieces(view)]
    # the agree's short spin: a large index can take seconds to arrive
    _wait_or_break(comm, requests, what, f"a broadcast of {len(view)} bytes from rank {root}", SPIN)


def send_all(comm: Comm, rank: int, buffers: Sequence[Any], what: str, tag: int = STREAM_TAG) -> None:
    """Send ``buffers`` to ``rank``, in order, each in messages of at most STREAM_PIECE
    bytes (as :func:`receive` takes them), and wait until all are sent: one wait for a
    header and its bytes, not one each. Bounded by ``comm.timeout``."""
    from mpi4py import MPI

    mpi = comm._usable(what)
    deadline = None if comm.timeout is None else time.monotonic() + comm.timeout
    requests = [
        mpi.Isend([view[lo : lo + STREAM_PIECE], MPI.BYTE], dest=rank, tag=tag)
        for buf in buffers
        for view in [memoryview(buf).cast("B")]
        for lo in range(0, len(view), STREAM_PIECE)
    ]
    _wait(comm, requests, [rank], deadline, what)


def receive(comm: Comm, rank: int, view: memoryview, what: str, tag: int = STREAM_TAG) -> None:
    """Exactly ``len(view)`` bytes (at most STREAM_PIECE: one message of
    :func:`send_all`'s) from ``rank`` into ``view``. Bounded by ``comm.timeout``."""
    from mpi4py import MPI

    assert len(view) <= STREAM_PIECE, len(view)
    mpi = comm._usable(what)
    deadline = None if comm.timeout is None else time.monotonic() + comm.timeout
    _wait(comm, [mpi.Irecv([view, MPI.BYTE], source=rank, tag=tag)], [rank], deadline, what)


def _wait(comm: Comm, requests: list, peers: list, deadline: float | None, what: str) -> None:
    from mpi4py import MPI

    if not _poll(lambda: MPI.Request.Testall(requests), deadline):
        for req in requests:
            req.Cancel()
        raise errors.DeadlineExceededError(
            f"{what}: rank {comm.rank} exchanged no bytes with ranks {peers} within {comm.timeout:g} s"
        )


def split(comm: Comm, color: int, key: int) -> Comm:
    """Collective: the ranks of ``comm`` with the same ``color``, ordered by ``key``, as a
    Comm of their own (freed when it is closed or collected)."""
    if comm._comm is None:
        return Comm(None, comm.timeout)
    sub = comm._usable().Split(color, key)
    if sub.Get_size() == 1:
        sub.Free()
        return Comm(None, comm.timeout)
    return Comm(sub, comm.timeout, owned=True)


def duplicate(comm: Comm) -> Comm:
    """Collective: a duplicate of ``comm`` (its own message space), bounded by its timeout."""
    if comm._comm is None:
        return Comm(None, comm.timeout)
    return Comm(_duplicate(comm._usable(), comm.timeout), comm.timeout, owned=True)


def xor_reduce_scatter(sub: Comm, buf: np.ndarray) -> np.ndarray:
    """``buf`` (uint8, ``sub.size * c`` bytes) of every member XORed together; member ``d``
    gets bytes ``[d*c, (d+1)*c)``. MPI's own reduction (Reduce_scatter_block, BXOR), on
    64-bit words when ``c`` is a multiple of 8 (eight times fewer operations than bytes)."""
    buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    if len(buf) % sub.size:
        raise errors.InvalidArgumentError(f"xor_reduce_scatter: {len(buf)} bytes for {sub.size} members")
    c = len(buf) // sub.size
    if sub._comm is None:
        return buf.copy()
    from mpi4py import MPI

    mpi = sub._usable()
    word, kind = (8, MPI.UINT64_T) if c % 8 == 0 else (1, MPI.BYTE)
    dtype = np.uint64 if word == 8 else np.uint8
    out = np.empty(c // word, dtype)
    parts = buf.view(dtype).reshape(sub.size, c // word)
    step = max(1, PIECE // word // sub.size)
    for lo in range(0, c // word, step):
        hi = min(c // word, lo + step)
        send = parts if (lo, hi) == (0, c // word) else np.ascontiguousarray(parts[:, lo:hi])
        mpi.Reduce_scatter_block([send, kind], [out[lo:hi], kind], op=MPI.BXOR)
    return out.view(np.uint8)


def xor_stream(
    sub: Comm,
    c: int,
    window: Callable[[int, int, int], np.ndarray],
    sink: Callable[[memoryview], None],
) -> None:
    """:func:`xor_reduce_scatter` of slots of ``c`` bytes, a window of at most
    ``STREAM_PIECE`` bytes of each slot at a time: ``window(lo, hi, width)`` gives this
    member's bytes ``[lo, hi)`` of every slot, zero-padded to ``width`` (a multiple of 8:
    MPI reduces 64-bit words), shape ``(sub.size, width)``; ``sink`` gets this member's
    reduced ``[lo, hi)``. Memory stays at a few windows whatever the file's size."""
    for lo in range(0, c, STREAM_PIECE):
        hi = min(c, lo + STREAM_PIECE)
        width = -(-(hi - lo) // 8) * 8
        out = xor_reduce_scatter(sub, window(lo, hi, width).reshape(-1))
        sink(memoryview(out)[: hi - lo])


def host_of_node(comm: Comm) -> str:
    """Collective: the host name of the lowest rank sharing memory with this one
    (``Split_type(COMM_TYPE_SHARED)``): the same string on every rank of a node."""
    if comm._comm is None:
        return socket.gethostname()
    from mpi4py import MPI

    local = comm._usable().Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return Comm(local, comm.timeout).bcast(socket.gethostname(), root=0)
    finally:
        local.Free()
