"""The CheckpointManager's fast tier (``local_directory=``): what the manager asks of it,
in one object, so the manager keeps its own concerns (steps, policy, preemption).

- :meth:`MultiLevel.save`: a save to the fast tier (``Saver._save`` with FastSave);
- :meth:`MultiLevel.saved`: once it committed: its steps, and whether it persists;
- :meth:`MultiLevel.start_drain` / :meth:`join_drain`: the drain of a step to the
  durable tier in the background (drain.py), one at a time;
- :meth:`MultiLevel.inventory` / :meth:`restore`: a restart from the fast tier
  (restart.py).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .. import storage
from ..errors import InvalidArgumentError
from ..save import protocol as save_protocol
from . import files, restart
from .drain import Drain
from .fast_save import FastSave
from .tier import FastTier, check_options

if TYPE_CHECKING:
    from ..save.pending import SaveHandle
    from ..saver import Saver


def _not_the_durable(tier: FastTier, durable: storage.Location) -> None:
    if storage.same_path(tier.location, durable):
        raise InvalidArgumentError(
            f"local_directory {tier.location.url} is the durable directory too: the fast tier needs a "
            "directory of its own on each node (its files have the durable tier's names)"
        )


class MultiLevel:
    def __init__(
        self,
        saver: Saver,
        directory: str,
        local_directory: str | os.PathLike,
        checkpoint_name: str,
        *,
        max_to_keep: int,
        persist_interval_steps: int | None,
        redundancy: str,
        group_size: int,
    ):
        self.saver = saver
        self.persist_interval_steps = persist_interval_steps
        self.tier = FastTier(
            saver.comm,
            os.fspath(local_directory),
            checkpoint_name,
            max_to_keep=max_to_keep,
            scheme=redundancy,
            group_size=group_size,
        )
        try:
            durable = storage.resolve(os.fspath(directory), saver.storage_options, saver.fs)
            saver.comm.every_rank(
                f"opening the fast tier {local_directory}", lambda: _not_the_durable(self.tier, durable)
            )
            steps = restart.take_inventory(self.tier).steps[::-1]
        except BaseException:
            self.tier.close()
            raise
        self.steps: list[int] = steps
        """The fast tier's committed steps (on some node), oldest first."""
        self.last: FastSave | None = None
        self.last_metrics: dict | None = None
        self.drain: Drain | None = None
        self.drained: set[int] = set()

    @classmethod
    def open(
        cls,
        saver: Saver,
        directory: str,
        local_directory: Any,
        checkpoint_name: str,
        max_to_keep: int,
        persist_interval_steps: int | None,
        redundancy: str,
        group_size: int,
    ) -> MultiLevel | None:
        """The manager's fast tier, or None without a ``local_directory``."""
        check_options(local_directory, max_to_keep, redundancy, group_size, persist_interval_steps)
        if local_directory is None:
            return None
        return cls(
            saver,
            directory,
            local_directory,
            checkpoint_name,
            max_to_keep=max_to_keep,
            persist_interval_steps=persist_interval_steps,
            redundancy=redundancy,
            group_size=group_size,
        )

    def persists(self, step: int, preempted: bool) -> bool:
        every = self.persist_interval_steps
        return preempted or (every is not None and step % every == 0)

    # ------------------------------------------------------------------ save
    def save(self, step: int, blocking: bool, metadata: dict) -> tuple[FastSave, str | SaveHandle]:
        if self.drain is not None and self.drain.step == step:  # saved again: its files are replaced
            self.drain.handle._join()  # its outcome is taken at the next join, as usual
        protocol = FastSave(self.tier, step, replace=step in self.steps)
        prefix = self.tier.location.child(files.base(self.tier.checkpoint_name, step)).path
        result = self.saver._save(
            prefix, None, "checkpoint", False, blocking, metadata, None, protocol=protocol
        )
        return protocol, result

    def saved(self, protocol: FastSave, metrics: dict | None) -> None:
        """Once a fast save committed (every rank alike)."""
        self.last, self.last_metrics = protocol, metrics
        kept = protocol.kept or []
        self.steps = sorted(set(kept) | {protocol.step})

    # ----------------------------------------------------------------- drain
    def start_drain(self, step: int, prefix: str, retain, storage_options: dict | None, fs: Any) -> None:
        """Drain ``step`` (the last fast save's) to ``prefix`` in the background."""
        assert self.last is not None and self.last.step == step and self.last.committed is not None
        loc = storage.resolve(prefix, storage_options, fs)
        job = save_protocol.SaveJob.of(
            self.saver, None, prefix, loc, "checkpoint", True, lambda t: retain([], prefix, t)
        )
        job = replace(job, comm=self.tier.drain_comm, storage_options=storage_options, fs=fs)
        manifest = self.last.committed["manifest"]
        self.drain = Drain(self.tier, job, step, manifest.nranks, self.last.committed["index"])

    def join_drain(self) -> int | None:
        """Wait for the running drain, if any; its step, or raise its error."""
        drain, self.drain = self.drain, None
        if drain is None:
            return None
        drain.join()
        self.drained.add(drain.step)
        return drain.step

    # --------------------------------------------------------------- restore
    def inventory(self) -> restart.Inventory:
        inv = restart.take_inventory(self.tier)
        self.steps = inv.steps[::-1]
        return inv

    def restore(self, inv: restart.Inventory, step: int) -> tuple[dict, Any]:
        """Restore ``step`` from the fast tier or raise restart.Unrestorable."""
        return restart.restore_step(self.tier, self.saver, inv, step)

    def close(self) -> None:
        self.tier.close()
