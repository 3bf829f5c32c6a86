"""Which rank writes which data file when the ranks of a node share ``k`` files
(``Saver(files_per_node=k)``; pure: every rank computes the same groups from the same
all-gathered node ids).

Each node's ranks, in rank order, are cut into ``min(k, ranks on the node)`` runs of
consecutive ranks (sizes differing by at most one, the longer first); the first rank of a
run is its *writer*, and the run's ranks are its *members*, writer first. A file holds its
members' bytes back to back in that order. Files are numbered (the index's ``shard_id``,
the ``i`` of ``.data-i-of-n``) by their writers' ranks, so with one rank per file they are
numbered exactly as in a save without ``files_per_node``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class FileGroups:
    members: tuple[tuple[int, ...], ...]
    """For each data file (by shard id): the ranks whose bytes it holds, in file order;
    the first is the rank that writes it."""

    @property
    def files(self) -> int:
        return len(self.members)

    @cached_property
    def writers(self) -> tuple[int, ...]:
        return tuple(group[0] for group in self.members)

    @cached_property
    def shard_of(self) -> dict[int, int]:
        """Every rank's data file."""
        return {rank: shard for shard, group in enumerate(self.members) for rank in group}

    def base(self, rank: int, sizes: Sequence[int]) -> int:
        """Where ``rank``'s bytes start in its file, given every rank's byte count."""
        group = self.members[self.shard_of[rank]]
        return sum(sizes[r] for r in group[: group.index(rank)])


def file_groups(nodes: Sequence[str], per_node: int) -> FileGroups:
    """``nodes[rank]``: each rank's node id; ``per_node``: files per node (at least 1)."""
    assert per_node >= 1, per_node
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    groups = []
    for ranks in by_node.values():
        count = min(per_node, len(ranks))
        size, extra = divmod(len(ranks), count)
        start = 0
        for i in range(count):
            stop = start + size + (1 if i < extra else 0)
            groups.append(tuple(ranks[start:stop]))
            start = stop
    return FileGroups(tuple(sorted(groups)))
