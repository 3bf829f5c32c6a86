"""Copying a fast-tier step to the durable tier: an ordinary checkpoint, committed as a
save is (save/commit.py), so the durable tier only ever holds complete ones.

Collective over ``job.comm``: the coordinator prepares the durable prefix; every rank
copies the fast-tier files it holds (its own data file, for a drain; whatever its node
holds, for ``shardsave scavenge``) to the durable data files; the ranks agree; the
coordinator commits the step's index (already made by the fast save), writes the state
file and applies retention (save/protocol.finish). :class:`Drain` runs it in a thread on
the tier's own communicator while training goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import storage
from ..errors import FailedPreconditionError, NotFoundError
from ..save import protocol as save_protocol
from ..save.commit import prepare
from ..save.pending import SaveHandle

if TYPE_CHECKING:
    from .tier import FastTier

log = logging.getLogger("shardsave")
CHUNK = 8 << 20


def copy_to_durable(
    job: save_protocol.SaveJob,
    directory: storage.Location,
    mine: dict[int, str],
    nranks: int,
    index: bytes,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Every rank copies ``mine`` (saving rank -> file name in ``directory``, its node's
    fast-tier directory) to ``job.prefix``'s data files; every saving rank's file must be
    some rank's. Returns the coordinator's timestamp of the commit."""
    comm, what = job.comm, job.what
    mode = comm.coordinator_only(what, lambda: prepare(job.loc, fsync=job.fsync))
    written: dict[int, tuple[int, str | None]] = {}
    made: list[storage.Location] = []
    error = None
    try:
        for r, name in sorted(mine.items()):
            dest = job.loc.with_path(mode.data_path(job.loc.path, r, nranks))
            made.append(dest)
            written[r] = _copy(directory.child(name), dest, job.fsync, progress)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
        error = exc
    try:
        comm.agree(error, what)
    except Exception:
        storage.remove(made)
        raise
    gathered = comm.gather(written)

    def commit() -> float:
        reports: dict[int, tuple[int, str | None]] = {}
        for part in gathered:
            reports.update(part)
        missing = sorted(set(range(nranks)) - set(reports))
        if missing:
            raise FailedPreconditionError(f"{what}: no rank copied the data files of ranks {missing}")
        timestamp = time.time()
        save_protocol.finish(job, mode, [reports[r] for r in range(nranks)], index, timestamp)
        return timestamp

    return comm.coordinator_only(what, commit)


def _copy(src: storage.Location, dest: storage.Location, fsync: bool, progress) -> tuple[int, str | None]:
    size = storage.size(src)
    if size is None:
        raise NotFoundError(f"copying {src.url} to {dest.url}: {src.url} does not exist")
    out = storage.Writer(dest, fsync=fsync, size_hint=size)
    buf = bytearray(min(CHUNK, max(size, 1)))
    try:
        for offset in range(0, size, CHUNK):
            view = memoryview(buf)[: min(CHUNK, size - offset)]
            storage.read_ranges(src, [(offset, view)])
            out.write(view)
            if progress is not None:
                progress(len(view))
        out.close()
    except BaseException:
        out.abort()
        raise
    return out.written, out.etag


class Drain:
    """One step's drain in a thread of its own, on the tier's drain communicator."""

    def __init__(self, tier: FastTier, job: save_protocol.SaveJob, step: int, nranks: int, index: bytes):
        self.tier, self.step = tier, step
        self.handle = SaveHandle(job.prefix)
        mine = {job.comm.rank: tier.data_name(step, job.comm.rank, nranks)}
        tier.draining[step] = self.handle
        self._thread = threading.Thread(
            target=self.handle._run,
            args=(self._run, job, mine, nranks, index),
            name=f"shardsave-drain-{step}",
            daemon=False,  # a job that exits without close() still finishes it (every rank does)
        )
        self._thread.start()

    def _run(self, job, mine, nranks, index) -> float:
        started = time.monotonic()
        timestamp = copy_to_durable(job, self.tier.location, mine, nranks, index)
        job.retain(timestamp)  # every rank: the manager's retention records its outcome
        if job.comm.is_coordinator:
            log.info("drained step %d to %s in %.2f s", self.step, job.prefix, time.monotonic() - started)
        return timestamp

    def join(self) -> None:
        """Wait; raise the drain's error. The step is no longer pinned in the fast tier."""
        try:
            self.handle.result()
        finally:
            self.tier.draining.pop(self.step, None)
