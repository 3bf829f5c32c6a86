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

import contextlib
import logging
import time
from dataclasses import dataclass

from .. import storage
from .._comm import Comm, peers
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
    suffix: str = "",
) -> Protection:
    """Collective, once every rank's data file of ``step`` is written in its node's
    ``directory`` (and the ranks agreed): write this rank's share of the redundancy.
    ``suffix``: on every file name (a re-save's staged names, swapped in at the commit).
    Every rank returns the same partners/sets/chunks, or raises the same error."""
    started = time.monotonic()
    what = f"protecting step {step} ({scheme})"
    if scheme == "none":
        return Protection(None, None, None, 0, 0.0)
    n, rank = comm.size, comm.rank
    own = directory.child(files.file(checkpoint_name, step, "data", rank, n) + suffix)
    if scheme == "partner":
        senders = topology.partner_senders(rank)
        copies = {
            s: directory.child(files.file(checkpoint_name, step, "partner", s, n) + suffix) for s in senders
        }
        # every rank's file mapped and every copy's file opened before any byte is sent
        own_map, writers = comm.every_rank(what, lambda: _open(own, sizes[rank], copies, fsync))
        try:
            comm.every_rank(
                what,
                lambda: peers.stream(
                    comm,
                    {topology.partner_of(rank): _bytes(own_map)},
                    {s: (sizes[s], writers[s].write) for s in senders},
                    f"sending partner copies of step {step}",
                ),
            )
            comm.every_rank(what, lambda: _finish(writers))
        finally:
            _abandon(own_map, writers)
        partners = tuple(topology.partner_of(r) for r in range(n))
        return Protection(partners, None, None, sizes[rank], time.monotonic() - started)
    assert groups is not None, "xor needs the Groups made at construction"
    chunks = tuple(chunk_size([sizes[r] for r in s]) for s in groups.sets)
    c = chunks[groups.sets.index(groups.members)]
    parity = directory.child(files.file(checkpoint_name, step, "parity", rank, n) + suffix)
    own_map, writers = comm.every_rank(what, lambda: _open(own, sizes[rank], {"parity": parity}, fsync))
    try:
        data, members, pos = _bytes(own_map), len(groups.members), groups.position
        try:
            peers.xor_stream(
                groups.sub,
                c,
                lambda lo, hi, width: xor.slots(data, pos, members, c, lo, hi, width),
                writers["parity"].write,
            )
        finally:
            data.release()  # before the map closes
        comm.every_rank(what, lambda: _finish(writers))
    finally:
        _abandon(own_map, writers)
    return Protection(None, groups.sets, chunks, c * (members - 1), time.monotonic() - started)


def _open(own: storage.Location, size: int, outputs: dict, fsync: bool):
    """This rank's data file mapped read-only (checked to be ``size`` bytes) and a writer
    for each file it will store."""
    own_map = storage.map_local(own, size)
    writers: dict = {}
    try:
        for key, loc in outputs.items():
            writers[key] = storage.Writer(loc, fsync=fsync)
    except BaseException:
        _abandon(own_map, writers)
        raise
    return own_map, writers


def _bytes(m) -> memoryview:
    return memoryview(m) if m is not None else memoryview(b"")


def _finish(writers: dict) -> None:
    for key in list(writers):
        writers[key].close()
        del writers[key]  # whole: not aborted by _abandon


def _abandon(own_map, writers: dict) -> None:
    """Close the map; abort the writers not closed (a failed step: the files go)."""
    for w in writers.values():
        w.abort()
    if own_map is not None:
        with contextlib.suppress(BufferError):  # still exported (a failed send): freed when collected
            own_map.close()
