"""Restoring a step from the fast tier, on any number of ranks and nodes (collective
over the tier's communicators).

1. :func:`take_inventory`: every node leader lists its directory and parses the
   manifests it holds; every rank gets everybody's (an all-gather);
2. :func:`restore_step`, for one step: the sources of every data file (sources.py);
   every rank starts its file server (_comm/serving.py); the holders of partner copies
   verify them whole against the index's CRCs, the rebuilders fetch their XOR sets'
   files, rebuild, verify in memory and write the file to their node; then the
   Saver's ordinary restore reads the step through a served view (view.py): each rank
   fetches only the ranges its blocks need, from whichever node holds them, every
   byte checked. Any failure of a copy or of the step raises :class:`Unrestorable`
   on every rank with the reason (the caller falls back); nothing is restored then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import storage
from .._comm.serving import FileServer
from .._verify import verify_checkpoint
from ..errors import DataLossError, NotFoundError, ShardsaveError, UnavailableError
from ..format.crc import crc32c
from . import files, sources, view, xor
from .manifest import MAX_BYTES, Manifest, parse

if TYPE_CHECKING:
    from ..saver import Saver
    from .tier import FastTier

log = logging.getLogger("shardsave")
UNUSABLE = (DataLossError, NotFoundError, UnavailableError)
"""A copy or a step that raises one of these is not used: the next source is tried."""


class Unrestorable(ShardsaveError):
    """The step cannot be restored from the fast tier (the message says why)."""


@dataclass
class Inventory:
    held: sources.Held = field(default_factory=dict)
    manifests: dict[int, Manifest] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        """Steps with a manifest somewhere, newest first."""
        return sorted(self.manifests, reverse=True)


def take_inventory(tier: FastTier) -> Inventory:
    comm = tier.comm

    def mine():
        if not tier.is_leader or (not tier.create and not storage.exists(tier.location)):
            return None
        by_step = tier.listing()
        listing = {name: size for held in by_step.values() for name, size in held.items()}
        found, damaged = {}, []
        for step in tier.committed_steps(by_step):
            loc = tier.location.child(files.manifest(tier.checkpoint_name, step))
            try:
                m = parse(storage.read_bytes(loc, limit=MAX_BYTES + 1), loc.url)
                if m.step != step or m.checkpoint_name != tier.checkpoint_name:
                    raise DataLossError(f"{loc.url}: the manifest of step {m.step} of {m.checkpoint_name!r}")
                found[step] = m
            except UNUSABLE as exc:
                damaged.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - a file's content must never stop the restart
                damaged.append(f"{loc.url}: not a valid fast-tier manifest ({type(exc).__name__}: {exc})")
        return tier.node, listing, found, damaged

    gathered = comm.allgather(comm.every_rank(f"listing the fast tier {tier.template}", mine))
    inv = Inventory()
    for item in gathered:
        if item is None:
            continue
        node, listing, found, damaged = item
        inv.held[node] = listing
        inv.damaged += damaged
        for step, m in found.items():  # the newest save of a step, if nodes differ
            if step not in inv.manifests or m.timestamp > inv.manifests[step].timestamp:
                inv.manifests[step] = m
    return inv


def restore_step(tier: FastTier, saver: Saver, inv: Inventory, step: int) -> tuple[dict, object]:
    """Restore ``step`` from the fast tier; return ``restored_from`` (see the manager) and
    what ``Saver.restore`` returned."""
    what = f"restoring step {step} from the fast tier {tier.template}"
    started = time.monotonic()
    comm = tier.comm
    server = FileServer(tier.serving, server_of(tier), what)
    try:
        manifest, plan, index = prepare_step(tier, server, inv, step, what)
        prepared = time.monotonic() - started  # partner copies checked, lost files rebuilt
        table = {files.index(tier.checkpoint_name, step): view.Source(len(index), data=index)}
        for f in plan.files:
            table[files.file(tier.checkpoint_name, step, "data", f.rank, manifest.nranks)] = view.Source(
                manifest.sizes[f.rank], serving_rank(tier, f.node, f.rank), f.name, f.node
            )
        the_view = view.View(f"fast tier {tier.template} step {step}", table, server)
        prefix = files.base(tier.checkpoint_name, step)
        try:
            restored = saver._restore(prefix, lambda p: view.location(the_view, p))
        except UNUSABLE as exc:
            # a variable the checkpoint lacks is the caller's state, not damage (as the
            # durable tier's fall-back decides, manager/resume.py)
            if comm.broken or " not found in checkpoint" in str(exc):
                raise
            raise Unrestorable(str(exc)) from None
    finally:
        server.stop()
    stats = saver.last_restore_stats
    out = {
        "step": step,
        "tier": "fast",
        "files": [{"rank": f.rank, "source": f.kind, "node": f.node} for f in plan.files],
        "bytes_read": the_view.bytes_read,
        "bytes_needed": stats.bytes_needed if stats is not None else None,
        "seconds": time.monotonic() - started,
        "rebuild_seconds": prepared,
    }
    if comm.is_coordinator:
        log.info("restored step %d from the fast tier %s: %s", step, tier.template, describe(plan))
    return out, restored


def prepare_step(
    tier: FastTier, server: FileServer, inv: Inventory, step: int, what: str
) -> tuple[Manifest, sources.StepSources, bytes]:
    """Collective, with every rank's server running: the step's manifest, its sources
    and its checked index; every partner copy to be used verified and every lost XOR
    member rebuilt, verified and written to its node. Raises Unrestorable."""
    manifest = inv.manifests[step]
    plan = sources.plan(manifest, inv.held, tier.topology)
    if plan.files is None:
        raise Unrestorable(plan.reason)
    comm = tier.comm
    try:
        index = comm.every_rank(what, lambda: _index(tier, server, manifest, plan))
        comm.every_rank(what, lambda: _verify_partners(tier, server, manifest, plan, index))
        comm.every_rank(what, lambda: _rebuild(tier, server, manifest, inv, plan, index))
    except UNUSABLE as exc:
        raise Unrestorable(str(exc)) from None
    return manifest, plan, index


def describe(plan: sources.StepSources) -> str:
    words = {"data": "data file", "partner": "partner copy", "rebuilt": "rebuilt from XOR parity"}
    return "; ".join(f"rank {f.rank}: {words[f.kind]} on node {f.node}" for f in plan.files or ())


# ------------------------------------------------------------------ the steps
def server_of(tier: FastTier):
    """What this rank serves: the fast-tier files of its node's directory."""

    def serve(name: str):
        if files.parse(tier.checkpoint_name, name) is None:
            raise NotFoundError(f"{name} is not a fast-tier file of {tier.checkpoint_name!r}")
        loc = tier.location.child(name)
        size = storage.size(loc)
        if size is None:
            raise NotFoundError(f"{loc.url} does not exist")
        return (lambda ranges: storage.read_ranges(loc, ranges)), size

    return serve


def serving_rank(tier: FastTier, node: str, salt: int) -> int:
    """A rank of ``node`` (spread over its ranks) that serves its files."""
    ranks = tier.topology.ranks_on(node)
    return ranks[salt % len(ranks)]


def _index(tier: FastTier, server: FileServer, manifest: Manifest, plan: sources.StepSources) -> bytes:
    """The step's index, from this rank's node if it holds one, checked against the manifest."""
    name = files.index(tier.checkpoint_name, manifest.step)
    nodes = sorted(plan.index_nodes, key=lambda n: n != tier.node)
    why = []
    for node in nodes:
        try:
            buf = bytearray(manifest.index_size)
        except MemoryError:
            raise DataLossError(
                f"step {manifest.step}: an index of {manifest.index_size} bytes does not fit in memory"
            ) from None
        try:
            server.fetch(serving_rank(tier, node, tier.comm.rank), name, [(0, memoryview(buf))])
        except UNUSABLE as exc:
            why.append(str(exc))
            continue
        if crc32c(buf) == manifest.index_crc:
            return bytes(buf)
        why.append(f"the copy of {name} on node {node} does not match its manifest's checksum")
    raise DataLossError(f"no node has a sound index of step {manifest.step}: {'; '.join(why)}")


def check_file(
    tier: FastTier,
    server: FileServer,
    manifest: Manifest,
    index: bytes,
    f: sources.FileSource,
    src: view.Source,
) -> None:
    """Verify one data file (a partner copy or a rebuilt file) whole against the index."""
    step, n = manifest.step, manifest.nranks
    table = {files.index(tier.checkpoint_name, step): view.Source(len(index), data=index)}
    for r in range(n):  # the other files' sizes (never read here)
        table[files.file(tier.checkpoint_name, step, "data", r, n)] = view.Source(manifest.sizes[r])
    table[files.file(tier.checkpoint_name, step, "data", f.rank, n)] = src
    the_view = view.View(f"fast tier {tier.template} step {step}", table, server)
    report = verify_checkpoint(
        view.location(the_view, files.base(tier.checkpoint_name, step)), shards={f.rank}
    )
    if not report.ok:
        kind = "partner copy" if f.kind == "partner" else "rebuilt data file"
        raise DataLossError(
            f"the {kind} of rank {f.rank} (on node {f.node}) fails its check against the index of "
            f"step {step}, so it is not used: {report.damage[0]}"
        )


def _verify_partners(
    tier: FastTier, server: FileServer, manifest: Manifest, plan: sources.StepSources, index: bytes
) -> None:
    """A rank of each node holding a partner copy to be used verifies it whole (the
    node's ranks share the copies)."""
    for f in plan.of_kind("partner"):
        if f.node == tier.node and serving_rank(tier, f.node, f.rank) == tier.comm.rank:
            src = view.Source(manifest.sizes[f.rank], tier.comm.rank, f.name, f.node)
            check_file(tier, server, manifest, index, f, src)


def _rebuild(
    tier: FastTier,
    server: FileServer,
    manifest: Manifest,
    inv: Inventory,
    plan: sources.StepSources,
    index: bytes,
) -> None:
    """Rebuilders (a rank of the node a lost file goes to; the node's ranks share the
    files) rebuild it from its XOR set."""
    by_rank = {f.rank: f for f in plan.files or ()}
    name, step, n = tier.checkpoint_name, manifest.step, manifest.nranks

    def read(kind: str, rank: int) -> bytearray:
        if kind == "data":
            holder = by_rank[rank]
            size, node, fname = manifest.sizes[rank], holder.node, holder.name
        else:
            which = next(i for i, s in enumerate(manifest.sets or ()) if rank in s)
            size, fname = (manifest.chunks or ())[which], files.file(name, step, "parity", rank, n)
            node = sources.parity_node(manifest, inv.held, rank)
        buf = bytearray(size)
        server.fetch(serving_rank(tier, node, rank), fname, [(0, memoryview(buf))])
        return buf

    for f in plan.of_kind("rebuilt"):
        if not (f.node == tier.node and serving_rank(tier, f.node, f.rank) == tier.comm.rank):
            continue
        try:
            data = xor.rebuild(manifest, f.rank, read)
        except MemoryError:
            raise DataLossError(
                f"step {step}: rebuilding the {manifest.sizes[f.rank]}-byte data file of rank {f.rank} does not fit in memory"
            ) from None
        check_file(tier, server, manifest, index, f, view.Source(len(data), data=data))
        storage.publish(tier.location.child(f.name), data, tier.fsync)
        log.info("fast tier: rebuilt the data file of rank %d of step %d on node %s", f.rank, step, f.node)
