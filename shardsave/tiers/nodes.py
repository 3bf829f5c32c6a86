"""Which node each rank is on (collective): ``SHARDSAVE_NODE_ID`` when it is set (on every
rank, or on none), else the host name shared by the ranks of
``Split_type(COMM_TYPE_SHARED)``, made a plain name. All-gathered into a Topology."""

from __future__ import annotations

import os
import re

from .._comm import Comm, peers
from .topology import Topology, check_node_id

ENV = "SHARDSAVE_NODE_ID"


def identify(comm: Comm, what: str = "finding the nodes") -> Topology:
    """Collective: every rank's node, the same Topology on every rank (or the same error)."""

    def mine() -> str | None:
        given = os.environ.get(ENV)
        return None if given is None else check_node_id(given)

    given = comm.every_rank(what, mine)
    everyone = comm.allgather(given)
    unset = [r for r, g in enumerate(everyone) if g is None]
    if unset and len(unset) != len(everyone):
        comm.agree(
            _mixed(unset, len(everyone)),
            what,
        )
    if not unset:
        return Topology(tuple(everyone))
    host = peers.host_of_node(comm)
    return Topology(tuple(comm.allgather(_plain(host))))


def _mixed(unset: list[int], size: int):
    from ..errors import InvalidArgumentError

    return InvalidArgumentError(
        f"{ENV} is set on some ranks but not on ranks {unset[:8]}{'...' if len(unset) > 8 else ''} "
        f"(of {size}): set it on every rank or on none"
    )


def _plain(host: str) -> str:
    """A host name as a node id: other characters become '-', at most 64 characters."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "-", host)[:64].lstrip("._-")
    return plain or "node"
