"""Where a fast-tier step's files can come from at a restart (pure: every rank computes
the same answer from the same inventory).

For each saving rank ``r``, in this order: its data file on a node of the job (its own
node first); the partner copy (``partner``); a rebuild from its XOR set's other data
files and parity (``xor``, one lost member per set); else the step cannot be restored
from the fast tier, and the reason says which file is on no node and why it cannot be
rebuilt. A file counts only if its size is the manifest's.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import files
from .manifest import Manifest
from .topology import Topology

Held = dict[str, dict[str, int]]
"""``{node: {file name: size}}``: what each node of the job holds in its fast-tier directory."""


@dataclass(frozen=True)
class FileSource:
    rank: int
    kind: str
    """``data``, ``partner`` or ``rebuilt``."""
    node: str
    """The node whose directory holds it (for ``rebuilt``: where it will be written)."""
    name: str
    """The file's name there."""


@dataclass(frozen=True)
class StepSources:
    step: int
    files: tuple[FileSource, ...] | None
    """One per saving rank, or None when the step cannot be restored from the fast tier."""
    index_nodes: tuple[str, ...]
    reason: str = ""

    def of_kind(self, kind: str) -> list[FileSource]:
        return [f for f in self.files or () if f.kind == kind]


def _nodes_with(held: Held, name: str, size: int, first: str | None = None) -> list[str]:
    found = [node for node, names in held.items() if names.get(name) == size]
    if first in found:
        found.remove(first)
        found.insert(0, first)
    return found


def plan(manifest: Manifest, held: Held, topology: Topology) -> StepSources:
    """The sources of every file of ``manifest``'s step, given what the job's nodes hold."""
    step, n, name = manifest.step, manifest.nranks, manifest.checkpoint_name
    index_nodes = tuple(_nodes_with(held, files.index(name, step), manifest.index_size))

    def missing(why: str) -> StepSources:
        return StepSources(step, None, index_nodes, why)

    if not index_nodes:
        return missing(f"no node holds the index of step {step}")
    data: dict[int, list[str]] = {
        r: _nodes_with(held, files.file(name, step, "data", r, n), manifest.sizes[r], manifest.nodes[r])
        for r in range(n)
    }
    out: list[FileSource] = []
    for r in range(n):
        own = files.file(name, step, "data", r, n)
        if data[r]:
            out.append(FileSource(r, "data", data[r][0], own))
            continue
        lost = f"the data file of rank {r} (node {manifest.nodes[r]!r}) is on no node of the job"
        if manifest.redundancy == "partner":
            copy = files.file(name, step, "partner", r, n)
            where = _nodes_with(held, copy, manifest.sizes[r])
            if not where:
                return missing(f"{lost}, nor is its partner copy")
            out.append(FileSource(r, "partner", where[0], copy))
            continue
        if manifest.redundancy == "xor":
            found = _rebuild_source(manifest, held, topology, data, r)
            if isinstance(found, str):
                return missing(f"{lost}, and it cannot be rebuilt: {found}")
            out.append(found)
            continue
        return missing(f"{lost}, and step {step} was saved without redundancy")
    return StepSources(step, tuple(out), index_nodes)


def _rebuild_source(
    manifest: Manifest, held: Held, topology: Topology, data: dict[int, list[str]], r: int
) -> FileSource | str:
    assert manifest.sets is not None and manifest.chunks is not None
    which = next(i for i, s in enumerate(manifest.sets) if r in s)
    members, chunk = manifest.sets[which], manifest.chunks[which]
    for m in members:
        if m == r:
            continue
        if not data[m]:
            return f"rank {m} of its XOR set {list(members)} is lost too"
        parity = files.file(manifest.checkpoint_name, manifest.step, "parity", m, manifest.nranks)
        if not _nodes_with(held, parity, chunk):
            return f"the parity of rank {m} of its XOR set {list(members)} is on no node"
    # written on the lost rank's own node if the job has it again, else beside a member's file
    home = manifest.nodes[r]
    node = home if topology.ranks_on(home) else data[next(m for m in members if m != r)][0]
    return FileSource(
        r, "rebuilt", node, files.file(manifest.checkpoint_name, manifest.step, "data", r, manifest.nranks)
    )


def parity_node(manifest: Manifest, held: Held, rank: int) -> str:
    """A node holding ``rank``'s parity of the step (``plan`` found one)."""
    assert manifest.chunks is not None and manifest.sets is not None
    which = next(i for i, s in enumerate(manifest.sets) if rank in s)
    name = files.file(manifest.checkpoint_name, manifest.step, "parity", rank, manifest.nranks)
    return _nodes_with(held, name, manifest.chunks[which])[0]
