"""Which rank is on which node, and who protects whom (pure: every rank computes the same
answer from the same all-gathered node ids).

A node is the set of ranks that share a local directory. ``partner``: every rank's data
file is also stored by a rank of the next node (a ring over the nodes, so a node's
files survive while the next node does). ``xor``: nodes form groups of
``group_size`` (the last group takes the remainder); within a group, the ranks with the
same position on their nodes form one XOR set, so a set has at most one rank per node and
losing one node of a group loses at most one member of each set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .._comm.nodes import NODE_ID, check_node_id  # noqa: F401 - the tier's node ids (manifest.py)
from ..errors import FailedPreconditionError

SCHEMES = ("none", "partner", "xor")


@dataclass(frozen=True)
class Topology:
    """``nodes[rank]``: the node id of each rank."""

    nodes: tuple[str, ...]

    @cached_property
    def node_names(self) -> tuple[str, ...]:
        """The distinct node ids, in the order of their first rank."""
        return tuple(dict.fromkeys(self.nodes))

    @cached_property
    def _ranks_on(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for rank, node in enumerate(self.nodes):
            out.setdefault(node, []).append(rank)
        return {node: tuple(ranks) for node, ranks in out.items()}

    @property
    def size(self) -> int:
        return len(self.nodes)

    def ranks_on(self, node: str) -> tuple[int, ...]:
        return self._ranks_on.get(node, ())

    def leader(self, node: str) -> int:
        """The lowest rank of ``node``: the one that writes its index, lists and deletes."""
        return self._ranks_on[node][0]

    def is_leader(self, rank: int) -> bool:
        return self.leader(self.nodes[rank]) == rank

    def position(self, rank: int) -> int:
        """Where ``rank`` is among its node's ranks (0 for the leader)."""
        return self._ranks_on[self.nodes[rank]].index(rank)

    # ----------------------------------------------------------------- partner
    def partner_of(self, rank: int) -> int:
        """The rank that stores ``rank``'s partner copy: on the next node (ring), at the
        same position there (modulo that node's ranks)."""
        names = self.node_names
        nxt = names[(names.index(self.nodes[rank]) + 1) % len(names)]
        theirs = self._ranks_on[nxt]
        return theirs[self.position(rank) % len(theirs)]

    def partner_senders(self, rank: int) -> tuple[int, ...]:
        """The ranks whose partner copies ``rank`` stores."""
        return tuple(r for r in range(self.size) if self.partner_of(r) == rank)

    # --------------------------------------------------------------------- xor
    def node_groups(self, group_size: int) -> tuple[tuple[str, ...], ...]:
        """Consecutive nodes in groups of ``group_size``; the remainder joins the last."""
        names = self.node_names
        count = max(1, len(names) // group_size)
        groups = [list(names[i * group_size : (i + 1) * group_size]) for i in range(count)]
        groups[-1].extend(names[count * group_size :])
        return tuple(tuple(g) for g in groups)

    def xor_sets(self, group_size: int) -> tuple[tuple[int, ...], ...]:
        """The XOR sets: in each node group, the ranks at the same position on their nodes
        (ascending rank order). Every rank is in exactly one set."""
        out = []
        for group in self.node_groups(group_size):
            depth = max(len(self._ranks_on[n]) for n in group)
            for pos in range(depth):
                members = tuple(self._ranks_on[n][pos] for n in group if pos < len(self._ranks_on[n]))
                out.append(members)
        return tuple(out)

    def xor_set_of(self, rank: int, group_size: int) -> tuple[int, ...]:
        return next(s for s in self.xor_sets(group_size) if rank in s)

    # ------------------------------------------------------------------ checks
    def check(self, scheme: str, group_size: int) -> None:
        """Raise, naming what is missing, if the scheme cannot protect these nodes (the
        options themselves are checked by tier.check_options)."""
        nodes = len(self.node_names)
        if scheme == "partner" and nodes < 2:
            raise FailedPreconditionError(
                f"redundancy='partner' needs ranks on at least 2 nodes; all {self.size} ranks are on "
                f"node {self.node_names[0]!r} (set SHARDSAVE_NODE_ID per node, or use redundancy='none')"
            )
        if scheme == "xor":
            if nodes < group_size:
                raise FailedPreconditionError(
                    f"redundancy='xor' with redundancy_group_size={group_size} needs ranks on at least "
                    f"{group_size} nodes; the {self.size} ranks are on {nodes} "
                    f"({', '.join(self.node_names)})"
                )
            for members in self.xor_sets(group_size):
                if len(members) < 2:
                    raise FailedPreconditionError(
                        f"redundancy='xor': rank {members[0]} (node {self.nodes[members[0]]!r}) has no "
                        "rank at its position on the other nodes of its group to share parity with; "
                        "give the nodes of a group the same number of ranks"
                    )
