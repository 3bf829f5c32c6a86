"""``shardsave scavenge``: after a job exits, copy the newest complete fast-tier step to
the durable tier if the durable tier has nothing as new (SCR's scavenge), run under
mpiexec on the job's nodes (any number of ranks per node).

Collective: the inventory of every node (restart.py), the newest step whose files all
survive somewhere (lost ones rebuilt from partner copies or parity, checked first); every
rank verifies the files of its node it will copy (a node's files are shared among its
ranks), then copies them
(drain.copy_to_durable: the durable index is committed only once every file is there)
and the state file lists the new checkpoint beside the ones it listed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import retention, storage
from .._comm import Comm
from .._comm.serving import FileServer
from ..errors import NotFoundError
from ..manager import steps
from ..save.protocol import SaveJob
from . import view
from .drain import copy_to_durable
from .restart import UNUSABLE, Unrestorable, check_file, prepare_step, server_of, serving_rank, take_inventory
from .tier import FastTier

log = logging.getLogger("shardsave")


def scavenge(
    local_directory: str,
    durable: str,
    *,
    checkpoint_name: str = "ckpt",
    storage_options: dict | None = None,
    timeout: float | None = 600.0,
    progress: Callable[[int, int], None] | None = None,
    comm=None,
    report: Callable[[int | None], None] | None = None,
) -> int | None:
    """The step copied to ``durable``, or None when there was nothing newer to copy;
    ``report(step)`` is called with it on the coordinator alone."""
    c = Comm.create(comm, timeout)
    tier = FastTier(
        c, local_directory, checkpoint_name, max_to_keep=1 << 30, scheme="none", group_size=2, create=False
    )
    what = f"scavenging {local_directory} to {durable}"
    try:
        inv = take_inventory(tier)
        if not inv.held:
            raise NotFoundError(f"{what}: {local_directory} is no directory on any node of the job")

        def find() -> steps.Found:
            return steps.find(
                durable, checkpoint_name, storage_options=storage_options, fs=None, with_metrics=False
            )

        found = c.coordinator_only(what, find)
        newest = max((e.step for e in found.committed), default=-1)
        copied = None
        for step in inv.steps:
            if step <= newest:
                break
            server = FileServer(tier.serving, server_of(tier), what)
            try:
                if _copy_step(c, tier, server, inv, step, durable, found, storage_options, progress, what):
                    copied = step
            finally:
                server.stop()
            if copied is not None:
                break
        if c.is_coordinator:
            if copied is None:
                log.info("%s: nothing to do (the durable tier's newest step is %s)", what, newest)
            if report is not None:
                report(copied)
        return copied
    finally:
        tier.close()
        c.close()


def _copy_step(c, tier, server, inv, step, durable, found, storage_options, progress, what) -> bool:
    try:
        manifest, plan, index = prepare_step(tier, server, inv, step, what)
        mine = [
            f
            for f in plan.files or ()
            if f.node == tier.node and serving_rank(tier, f.node, f.rank) == c.rank
        ]

        def verify() -> None:  # partner copies and rebuilt files are checked already
            for f in mine:
                if f.kind == "data":
                    src = view.Source(manifest.sizes[f.rank], c.rank, f.name, f.node)
                    check_file(tier, server, manifest, index, f, src)

        c.every_rank(what, verify)
    except (Unrestorable, *UNUSABLE) as exc:
        if c.is_coordinator:
            log.warning("%s: step %d cannot be copied, trying an older one: %s", what, step, exc)
        return False
    prefix = steps.prefix_of(durable, tier.checkpoint_name, step)
    tracked = [(e.prefix, e.timestamp) for e in found.tracked if e.step != step]

    def retain(timestamp: float) -> retention.Retained:
        return retention.Retained(tracked + [(prefix, timestamp)], [], float("inf"), found.last_preserved)

    job = SaveJob(
        comm=c,
        layout=None,
        prefix=prefix,
        loc=storage.resolve(prefix, storage_options),
        latest_filename="checkpoint",
        write_state=True,
        fsync=True,
        check_replicas=True,
        save_relative_paths=True,
        max_to_keep=None,
        keep_checkpoint_every_n_hours=10000.0,
        storage_options=storage_options,
        fs=None,
        retain=retain,
    )
    total = sum(manifest.sizes[f.rank] for f in mine)
    done = [0]

    def step_progress(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    copy_to_durable(job, tier.location, {f.rank: f.name for f in mine}, manifest.nranks, index, step_progress)
    if c.is_coordinator:
        log.info("%s: copied step %d to %s", what, step, prefix)
    return True
