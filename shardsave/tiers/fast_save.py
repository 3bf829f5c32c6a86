"""Saving one step to the fast tier: steps 2 to 5 of a save (save/protocol.py) with each
rank's data file in its own node's directory, redundancy before the commit, and an index
on every node.

1. plan, as a durable save;
2. node leaders uncommit any earlier save of this step on their node (its index and
   manifest go first), every rank makes its node's directory;
3. every rank writes ``<name>-<step>.data-<r>-of-<n>`` into its node's directory (fresh
   names, no staging, no fsync: the fast tier relies on redundancy, not on the disk);
   the ranks agree;
4. redundancy.protect (partner copies or XOR parity); agreed;
5. the coordinator merges the index and makes the manifest; every node leader publishes
   the manifest, then the index: the fast-tier commit point on that node. Only after
   every rank's file and its redundancy are written, so a kill before leaves the step
   without an index anywhere (never restored) and a kill during leaves a whole step;
6. node leaders delete what local retention lets go (the coordinator's list).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from time import monotonic
from typing import TYPE_CHECKING

from .. import storage
from ..errors import InvalidArgumentError
from ..format.crc import crc32c
from ..format.merge import merge_index
from ..save import protocol as save_protocol
from ..save.commit import SaveMode
from ..save.replicas import checked_replicas
from . import redundancy
from .manifest import MAX_INDEX, Manifest, parse

if TYPE_CHECKING:
    from .tier import FastTier

log = logging.getLogger("shardsave")


@dataclass
class FastSave:
    """The ``protocol`` of ``Saver._save`` for one fast-tier step."""

    tier: FastTier
    step: int
    replace: bool = False
    """The step is in the fast tier already: write under staged names and swap at the
    commit, so a failed save leaves the earlier save of the step whole."""
    committed: dict | None = None
    """Filled on commit: ``{"index": bytes, "manifest": Manifest}``."""
    kept: list[int] | None = None
    """Filled on commit: the steps the fast tier keeps."""

    def resolve(self, path: str) -> storage.Location:
        """This rank's node's directory, whatever the Saver's storage options (S3's)."""
        return storage.resolve(path)

    def key(self, key: dict) -> dict:
        """The ranks' prefixes differ (one directory per node): agree on the step instead."""
        return dict(
            key,
            prefix=f"fast tier step {self.step}",
            location=self.tier.template,
            redundancy=self.tier.redundancy,
        )

    def run(self, job: save_protocol.SaveJob, arrays, metas) -> str:
        job = replace(job, fsync=self.tier.fsync)
        tier, comm, step = self.tier, job.comm, self.step
        the_plan, todo, replicas = save_protocol.plan(job, arrays, metas)
        save_id, suffix = "0" * 16, ""  # fresh names: written as they are
        if self.replace:  # the same on every rank: one id for the staged names
            save_id = comm.bcast(uuid.uuid4().hex[:16] if comm.is_coordinator else None)
            suffix = f".{save_id}.staged"
        else:  # leftovers of an interrupted save of this step go first
            comm.every_rank(job.what, lambda: tier.uncommit(step))
        report = save_protocol.write(job, SaveMode(save_id, staged=self.replace), the_plan, todo, replicas)
        sizes = comm.allgather(report[1])
        protection = redundancy.protect(
            comm,
            tier.topology,
            tier.redundancy,
            tier.groups,
            tier.location,
            tier.checkpoint_name,
            step,
            sizes,
            fsync=tier.fsync,
            suffix=suffix,
        )
        gathered = comm.gather(report)

        def merge() -> tuple[bytes, bytes]:
            checked = checked_replicas(job.prefix, the_plan, [g[:3] for g in gathered])
            index = merge_index(
                len(checked),
                [part for part, _ in checked],
                {name: (dt, shape) for name, (dt, shape, _) in the_plan.sliced.items()},
            )
            if len(index) > MAX_INDEX:  # a restart would not believe it (manifest.py)
                raise InvalidArgumentError(
                    f"{job.what}: an index of {len(index)} bytes is more than the fast tier takes ({MAX_INDEX})"
                )
            manifest = Manifest(
                step=step,
                checkpoint_name=tier.checkpoint_name,
                nodes=tier.topology.nodes,
                sizes=tuple(sizes),
                redundancy=tier.redundancy,
                index_size=len(index),
                index_crc=crc32c(index),
                timestamp=time.time(),
                partners=protection.partners,
                sets=protection.sets,
                chunks=protection.chunks,
            )
            return index, manifest.encode()

        index, manifest_bytes = comm.coordinator_only(job.what, merge)
        if self.replace:  # the earlier save's commit point goes, the new files take its names
            comm.every_rank(job.what, lambda: tier.swap_in(step, suffix))
        comm.every_rank(job.what, lambda: tier.publish(step, index, manifest_bytes))
        keep = comm.coordinator_only(job.what, lambda: tier.keep_after(step))
        comm.every_rank(job.what, lambda: tier.delete_all_but(keep))
        self.kept = keep
        self.committed = {"index": index, "manifest": parse(manifest_bytes, "the manifest just made")}
        if comm.is_coordinator:
            log.info(
                "saved step %d to the fast tier %s (%s): %d bytes in %.2f s on %d ranks, %d nodes; "
                "this rank sent %d bytes for redundancy",
                step,
                tier.template,
                tier.redundancy,
                sum(sizes),
                monotonic() - job.started,
                comm.size,
                len(tier.topology.node_names),
                protection.bytes_sent,
            )
        tier.saved(step, protection)
        return job.prefix
