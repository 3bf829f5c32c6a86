"""Which node each rank is on, as a Topology (collective). The ids themselves are found
by ``_comm/nodes.py`` (``SHARDSAVE_NODE_ID``, else the shared-memory host name), which a
save with ``Saver(files_per_node=k)`` uses too."""

from __future__ import annotations

from .._comm import Comm
from .._comm.nodes import ENV, node_ids
from .topology import Topology

__all__ = ["ENV", "identify"]


def identify(comm: Comm, what: str = "finding the nodes") -> Topology:
    """Collective: every rank's node, the same Topology on every rank (or the same error)."""
    return Topology(node_ids(comm, what))
