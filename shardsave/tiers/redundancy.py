"""Protecting a fast-tier step against a lost node, after every rank wrote its data file.

``partner``: every rank sends its data file to ``topology.partner_of(rank)`` (a rank of the
next node) over MPI, which stores it as a ``partner`` file: 2x the storage, one file's
bytes sent per rank; a node is lost safely while the next node survives. A partner copy
needs no rebuilding: it *is* the file (checked against the index before use).

``xor``: the members of each XOR set (topology.xor_sets: one rank per node of a group)
reduce-scatter their padded files with MPI's BXOR (xor.py) and each stores its parity
chunk: ``1/(G-1)`` of a file more storage, about one file's bytes sent per rank; any one
node of a group is lost safely.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import storage
from .._comm import Comm, peers
from ..errors import DataLossError
from . import files, xor
from .manifest import chunk_size
from .topology import Topology

log = logging.getLogger("shardsave")


@dataclass(frozen=True)
class Protection:
    """What the manifest records of a step's redundancy, and what it cost this rank."""

    partners: tuple[int, ...] | None
    sets: tuple[tuple[int, ...], ...] | None
    chunks: tuple[int, ...] | None
    bytes_sent: int
    seconds: float


class Groups:
    """The XOR sets' sub-communicators, made once (collective) and kept for every save."""

    def __init__(self, comm: Comm, topology: Topology, group_size: int):
        self.sets = topology.xor_sets(group_size)
        mine = next(i for i, s in enumerate(self.sets) if comm.rank in s)
        self.members = self.sets[mine]
        self.position = self.members.index(comm.rank)
        self.sub = peers.split(comm, mine, comm.rank)

    def close(self) -> None:
        self.sub.close()


def protect(
    comm: Comm,
    topology: Topology,
    scheme: str,
    groups: Groups | None,
    directory: storage.Location,
    checkpoint_name: str,
    step: int,
    sizes: list[int],
    *,
    fsync: bool = False,
) -> Protection:
    """Collective, once every rank's data file of ``step`` is written in its node's
    ``directory`` (and the ranks agreed): write this rank's share of the redundancy.
    Every rank returns the same partners/sets/chunks, or raises the same error."""
    started = time.monotonic()
    what = f"protecting step {step} ({scheme})"
    if scheme == "none":
        return Protection(None, None, None, 0, 0.0)
    n = comm.size
    name = files.file(checkpoint_name, step, "data", comm.rank, n)
    if scheme == "partner":
        own = comm.every_rank(what, lambda: _own_file(directory, name, sizes[comm.rank], step))
        sent = comm.every_rank(
            what, lambda: _partner(comm, topology, own, directory, checkpoint_name, step, sizes, fsync)
        )
        partners = tuple(topology.partner_of(r) for r in range(n))
        return Protection(partners, None, None, sent, time.monotonic() - started)
    assert groups is not None, "xor needs the Groups made at construction"
    chunks = tuple(chunk_size([sizes[r] for r in s]) for s in groups.sets)
    data = comm.every_rank(what, lambda: _own_file(directory, name, sizes[comm.rank], step))
    c = chunks[groups.sets.index(groups.members)]
    contribution = xor.slots(data, groups.position, len(groups.members), c)
    del data
    mine = peers.xor_reduce_scatter(groups.sub, contribution)
    del contribution
    parity = directory.child(files.file(checkpoint_name, step, "parity", comm.rank, n))
    comm.every_rank(what, lambda: _write(parity, mine, fsync))
    sent = c * (len(groups.members) - 1)
    return Protection(None, groups.sets, chunks, sent, time.monotonic() - started)


def _own_file(directory: storage.Location, name: str, size: int, step: int) -> bytes:
    loc = directory.child(name)
    data = storage.read_bytes(loc)
    if len(data) != size:
        raise DataLossError(f"{loc.url}: step {step}: {len(data)} bytes, but {size} were written")
    return data


def _partner(
    comm: Comm,
    topology: Topology,
    data: bytes,
    directory: storage.Location,
    checkpoint_name: str,
    step: int,
    sizes: list[int],
    fsync: bool,
) -> int:
    """Send this rank's data file to its partner and store the copies it is sent."""
    n, rank = comm.size, comm.rank
    senders = topology.partner_senders(rank)
    recvs = {s: np.empty(sizes[s], np.uint8) for s in senders}
    peers.exchange(comm, {topology.partner_of(rank): data}, recvs, f"sending partner copies of step {step}")
    for s, buf in recvs.items():
        _write(directory.child(files.file(checkpoint_name, step, "partner", s, n)), buf, fsync)
    return len(data)


def _write(loc: storage.Location, data, fsync: bool) -> None:
    out = storage.Writer(loc, fsync=fsync)
    try:
        out.write(memoryview(data).cast("B"))
        out.close()
    except BaseException:
        out.abort()
        raise
