"""Pickled collectives (``bcast``, ``gather``, ``allgather``, ``scatter``) bounded by the
Comm's timeout.

mpi4py's lowercase collectives block until every rank has called them, so a rank that
stopped between two steps (stuck in a filesystem call, or a caller's loop that skipped a
save on one rank) would keep the others waiting forever. Here every wait is polled until
``comm.timeout``: a rank that never arrives costs DeadlineExceededError naming the step,
and the Comm refuses further use (the ranks may be at different steps; a collective
cannot be cancelled). Each call is one exchange, as the blocking ones are: a broadcast
carries a pickle of up to INLINE bytes in its one fixed-size message (larger ones follow
raw, by ``peers.bcast_bytes``); a gather and a scatter are pickled point-to-point
messages, which the receiver takes as they arrive (``improbe``). The objects come only
from the ranks of the same job, as with mpi4py's own (pickling) collectives; no file's
bytes are ever unpickled.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors
from . import _poll_or_break, _wait_or_break

if TYPE_CHECKING:
    from . import Comm

GATHER_TAG = 0x5A512
SCATTER_TAG = 0x5A513
INLINE = 4096
"""Bytes of a broadcast's one message: its pickle's size, and the pickle if it fits."""


def bcast(comm: Comm, obj: Any, root: int, what: str) -> Any:
    """``obj`` of rank ``root`` on every rank."""
    from mpi4py import MPI

    from . import peers

    mpi = comm._usable(what)
    header = np.zeros(INLINE, np.uint8)
    if comm.rank == root:
        payload = _dumps(obj)
        header[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), np.uint8)
        if len(payload) <= INLINE - 8:
            header[8 : 8 + len(payload)] = np.frombuffer(payload, np.uint8)
    _wait_or_break(comm, [mpi.Ibcast([header, MPI.BYTE], root=root)], what, f"a broadcast from rank {root}")
    size = int.from_bytes(header[:8].tobytes(), "little")
    if size <= INLINE - 8:
        return obj if comm.rank == root else pickle.loads(header[8 : 8 + size].tobytes())
    if comm.rank == root:
        peers.bcast_bytes(comm, payload, what, root)
        return obj
    buf = bytearray(size)
    peers.bcast_bytes(comm, buf, what, root)
    return pickle.loads(buf)


def gather(comm: Comm, obj: Any, root: int, what: str) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank ``root``; None on the others."""
    from mpi4py import MPI

    mpi = comm._usable(what)
    doing = f"a gather to rank {root}"
    if comm.rank != root:
        _wait_or_break(comm, [mpi.isend(obj, dest=root, tag=GATHER_TAG)], what, doing)
        return None
    got: dict[int, Any] = {root: obj}
    ahead = comm._ahead  # sent by a rank for a later gather, which it reached first
    for rank, queued in ahead.items():
        if queued and rank not in got:
            got[rank] = queued.pop(0)
    status = MPI.Status()

    def arrived() -> bool:
        while (message := mpi.improbe(source=MPI.ANY_SOURCE, tag=GATHER_TAG, status=status)) is not None:
            rank, value = status.Get_source(), message.recv()
            if rank in got:
                ahead.setdefault(rank, []).append(value)
            else:
                got[rank] = value
        return len(got) == comm.size

    _poll_or_break(comm, arrived, what, doing)
    return [got[rank] for rank in range(comm.size)]


def allgather(comm: Comm, obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    return bcast(comm, gather(comm, obj, 0, what), 0, what)


def scatter(comm: Comm, objs: list[Any] | None, root: int, what: str) -> Any:
    """``objs[rank]`` (given on ``root`` only) to each rank."""
    mpi = comm._usable(what)
    doing = f"a scatter from rank {root}"
    if comm.rank == root:
        if objs is None or len(objs) != comm.size:
            raise errors.InvalidArgumentError(f"{what}: scatter needs {comm.size} objects on rank {root}")
        sends = [mpi.isend(o, dest=rank, tag=SCATTER_TAG) for rank, o in enumerate(objs) if rank != root]
        _wait_or_break(comm, sends, what, doing)
        return objs[root]
    got: list[Any] = []

    def arrived() -> bool:
        message = mpi.improbe(source=root, tag=SCATTER_TAG)
        if message is not None:
            got.append(message.recv())
        return bool(got)

    _poll_or_break(comm, arrived, what, doing)
    return got[0]


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
