"""The coordinator's bytes on every rank (a restore's index), raw, and from
``SHARE_MIN_BYTES`` once per node: one copy of a buffer that every rank reads but none
writes. The coordinator broadcasts it to the lowest rank of each node, which receives it
into a file in ``/dev/shm`` that the other ranks of its node map read-only; the file is
unlinked as soon as they have. Ten million index entries (563 MB) then cost a node
563 MB, not 563 MB a rank. A node that cannot share (no ``/dev/shm``, too little room in
it) gets a private copy on each rank, as below ``SHARE_MIN_BYTES``.

Why a file, not ``MPI_Win_allocate_shared``: freeing a window is collective and unmaps
the memory under any view still held (a crash, not an error); a mapped file stays
mapped while a view of it lives (Python's mmap refuses to close under exported buffers),
and no rank waits for another to let go. The room is reserved with ``posix_fallocate``
before a byte is written, so a full tmpfs is an error here, not a SIGBUS later. Nodes are
``nodes.known_node_ids`` (``SHARDSAVE_NODE_ID``, else the ranks sharing memory), found once
per communicator.
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from .. import errors
from . import Comm, peers
from .nodes import known_node_ids

log = logging.getLogger("shardsave")

SHARE_MIN_BYTES = 64 << 20
"""Smaller buffers are broadcast to every rank: two sub-communicators and a file per
node are not worth it for an index of fewer than about a million entries."""

SHM_DIR = "/dev/shm"
"""Where the node's copy lives: a tmpfs on Linux (memory, not disk)."""

_NODES: weakref.WeakKeyDictionary[Comm, tuple[Comm, Comm, bool, int]] = weakref.WeakKeyDictionary()


def coordinator_bytes(comm: Comm, what: str, step: Callable[[], bytes], *, key: dict | None = None):
    """``Comm.coordinator_only`` for a step that returns bytes (an index): broadcast raw,
    not pickled, so that no rank holds two or three copies of a large buffer (pickling
    560 MB on the coordinator, unpickling it on every other rank: 4.8 s and 1.1 GB more
    per rank on 4 ranks here, against 0.7 s and none; benchmarks/bcast_bench.py). From
    ``SHARE_MIN_BYTES`` the ranks of a node share one copy (``broadcast``): the result
    is then a mapped file (``mmap``), else bytes or a bytearray."""
    data = comm.coordinator_step(what, step, key=key)
    if comm._comm is None:
        return data
    size = comm.bcast(None if data is None else len(data))
    if size >= SHARE_MIN_BYTES:
        try:  # agreed: a node whose copy failed makes every rank raise, not wait
            return comm.every_rank(what, lambda: broadcast(comm, what, data, size))
        except Exception:
            _NODES.pop(comm, None)  # on every rank: the next call splits afresh
            raise
    buf = data if comm.is_coordinator else bytearray(size)
    peers.bcast_bytes(comm, buf, what)
    return buf


def broadcast(comm: Comm, what: str, data: Any, size: int) -> Any:
    """Collective: the coordinator's ``data`` (``size`` bytes, None elsewhere) on every
    rank, as a mapped file shared by the ranks of a node where that works, else as a
    private copy. Every wait is bounded by ``comm.timeout``: the node's ranks wait for
    their leader in a bounded step, and its failure fails them all."""
    node, heads, alone, first = _communicators(comm, what)
    leader = first == comm.rank
    shared: tuple[mmap.mmap, str] | None = None
    buf: Any = None

    def receive() -> str | None:
        """The node's leader: the bytes from the coordinator (across the nodes first, so
        that no node waits for another's copy), into the node's file if it can have one."""
        nonlocal shared, buf
        shared = None if alone else _create(size)
        buf = data if comm.is_coordinator else (shared[0] if shared else bytearray(size))
        peers.bcast_bytes(heads, buf, what)
        if comm.is_coordinator and shared:
            shared[0][:] = data
        return shared[1] if shared else None

    try:
        path, error = None, None
        if leader:
            try:
                path = receive()
            except Exception as exc:  # noqa: BLE001 - raised below, and told to the node's ranks
                error = exc
        if not node.all_true(error is None):
            raise error or errors.AbortedError(
                f"{what}: rank {first}, the first rank of this node, did not receive the bytes for it"
            )
        path = node.bcast(path)  # every rank of the node is here: its leader succeeded
        mapped = _open(path) if path and not leader else None
        if node.all_true(leader or mapped is not None) and path:
            return shared[0] if leader else mapped
        # no file, or a rank of this node could not map it: every rank gets a private copy
        private = buf if leader and not shared else bytearray(size)
        if leader and shared:
            private[:] = shared[0]
        peers.bcast_bytes(node, private, what)
        return private
    finally:
        if shared:
            _unlink(shared[1])


def _communicators(comm: Comm, what: str) -> tuple[Comm, Comm, bool, int]:
    """The ranks of this rank's node, the lowest rank of every node (a useless group of
    the others for the rest), whether this rank is alone on its node, and the lowest rank
    of its node: made once per communicator (collective)."""
    found = _NODES.get(comm)
    if found is None:
        nodes = known_node_ids(comm, what)
        order = {node: i for i, node in enumerate(dict.fromkeys(nodes))}
        mine = nodes[comm.rank]
        first = nodes.index(mine)
        node = peers.split(comm, order[mine], comm.rank)
        heads = peers.split(comm, 0 if first == comm.rank else 1, comm.rank)
        found = _NODES[comm] = (node, heads, nodes.count(mine) == 1, first)
    return found


def _create(size: int) -> tuple[mmap.mmap, str] | None:
    """A file of ``size`` bytes in SHM_DIR with its room reserved, mapped for writing, or
    None (logged) if the node cannot have one."""
    path = os.path.join(SHM_DIR, f"shardsave-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        log.debug("no node-shared copy in %s (%s): private copies", SHM_DIR, exc)
        return None
    try:
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size), path
    except (OSError, ValueError) as exc:
        log.debug("no node-shared copy of %d bytes in %s (%s): private copies", size, SHM_DIR, exc)
        _unlink(path)
        return None
    finally:
        os.close(fd)


def _open(path: str) -> mmap.mmap | None:
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        log.debug("cannot map the node-shared copy %s (%s): private copies", path, exc)
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:  # already gone is fine; anything else leaves a file in /dev/shm
        log.debug("cannot remove %s: %s", path, exc)
