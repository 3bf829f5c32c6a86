"""``CheckpointManager``: a training loop's one object for saving every N steps, keeping a
few, resuming after a crash and saving once more on a preemption notice, on any number of
ranks (TF2's ``tf.train.CheckpointManager`` and Orbax's, over a :class:`~shardsave.Saver`).

Every method is collective except the queries (``latest_step``, ``all_steps``,
``best_step``, ``metadata``). The manager's own agreements (step boundaries, preemption,
the directory's listing) run on a duplicate communicator of its own, so they never mix
with a non-blocking save's, which runs on the Saver's in a background thread.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import gcpause, retention
from ..errors import FailedPreconditionError, InvalidArgumentError, ShardsaveError
from ..metadata import read_metadata
from ..save.pending import SaveHandle
from ..saver import Saver
from ..tiers.fast_save import FastSave
from ..tiers.levels import MultiLevel
from . import policy as retention_policy
from . import resume, steps
from .policy import Entry, Policy
from .preemption import PreemptionWatcher

log = logging.getLogger("shardsave")


@dataclass
class _Pending:
    step: int
    prefix: str
    handle: SaveHandle | None
    outcome: dict  # filled by the retention hook ("outcome": policy.Outcome)
    started: float
    fast: FastSave | None = None  # a save to the fast tier
    persist: bool = False  # drained to the durable tier once committed
    metrics: dict | None = None


class CheckpointManager:
    """Saves ``state`` to ``directory/<checkpoint_name>-<step>`` and keeps the checkpoints
    ``max_to_keep`` / ``keep_checkpoint_every_n_hours`` (TF2's rules) or ``best_metric``
    (the ``max_to_keep`` best by ``metrics[best_metric]``, smallest with ``best_mode="min"``,
    and always the newest) allow, across restarts: see policy.py and steps.py.

    ``state``: a :class:`Saver` (used as it is, its ``comm`` too unless ``comm`` is given),
    or anything ``Saver(state)`` takes (a var_list, a nested mapping of arrays). Preemption
    signals (SIGTERM, SIGUSR1) are watched from construction until :meth:`close`.

    With ``local_directory`` (``{node}`` in it is replaced by the node id) every save goes
    to a fast node-local tier, protected by ``redundancy`` ("none", "partner" copies on
    the next node, or "xor" parity over groups of ``redundancy_group_size`` nodes), and
    keeps ``local_max_to_keep`` steps there; every step that is a multiple of
    ``persist_interval_steps``, the step saved on a preemption notice and (with
    ``close(persist=True)``) the last one are drained to ``directory`` in the background,
    where ``max_to_keep`` and the rest apply. See tiers/ and docs/DESIGN.md.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        state: Any,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        save_interval_steps: int = 1,
        checkpoint_name: str = "ckpt",
        best_metric: str | None = None,
        best_mode: str = "min",
        comm: Any = None,
        storage_options: dict | None = None,
        timeout: float | None = 1800.0,
        local_directory: str | os.PathLike | None = None,
        local_max_to_keep: int = 2,
        persist_interval_steps: int | None = None,
        redundancy: str = "none",
        redundancy_group_size: int = 4,
    ):
        self._policy = Policy(max_to_keep, keep_checkpoint_every_n_hours, best_metric, best_mode)
        if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int):
            raise InvalidArgumentError(f"save_interval_steps must be an int, not {save_interval_steps!r}")
        if save_interval_steps < 1:
            raise InvalidArgumentError(f"save_interval_steps must be at least 1, not {save_interval_steps}")
        if not isinstance(checkpoint_name, str) or not checkpoint_name or "/" in checkpoint_name:
            raise InvalidArgumentError(f"checkpoint_name must be a file name, not {checkpoint_name!r}")
        self.directory = os.fspath(directory)
        self.save_interval_steps = save_interval_steps
        self.checkpoint_name = checkpoint_name
        self._owns_saver = not isinstance(state, Saver)
        if self._owns_saver:
            state = Saver(
                state,
                max_to_keep=None,
                save_relative_paths=True,
                comm=comm,
                storage_options=storage_options,
                timeout=timeout,
            )
        self._saver: Saver = state
        self._storage_options = (
            storage_options if storage_options is not None else self._saver.storage_options
        )
        self._fs = self._saver.fs
        self._comm = steps.own_comm(comm, self._saver, timeout)
        self._pending: _Pending | None = None
        self._saved: set[int] = set()  # steps saved or restored by this manager: not again
        self._polled: tuple[int, bool] | None = None  # should_save's preemption answer, by step
        self._metadata: dict[int, dict | None] = {}
        self.restored_state: Any = None
        """What the last restore returned: the restored tree of a tree state, else None."""
        self._closed = False
        self._resumed = False  # restore_or_initialize ran: a save may replace later steps
        self.restored_from: dict | None = None
        """Where the last restore's data came from (manager/resume.py)."""
        self._draining: _Pending | None = None
        self._drain_error: ShardsaveError | None = None
        self._fast = MultiLevel.open(
            self._saver, self.directory, local_directory, checkpoint_name, local_max_to_keep, persist_interval_steps,
            redundancy, redundancy_group_size,
        )  # fmt: skip
        self._comm.begin("CheckpointManager")
        self._adopt(self._find())
        self._watcher = PreemptionWatcher().install()  # last: a failed construction leaves no handlers

    # ------------------------------------------------------------------ bookkeeping
    @property
    def saver(self) -> Saver:
        return self._saver

    def _find(self) -> tuple[steps.Found, float]:
        """The directory's checkpoints and the last preserved time, the coordinator's."""
        directory = self.directory

        def find() -> tuple[steps.Found, float]:
            found = steps.find(
                directory,
                self.checkpoint_name,
                storage_options=self._storage_options,
                fs=self._fs,
                with_metrics=self._policy.best_metric is not None,
            )
            # TF2: a fresh directory's clock starts now (minus a second against quick restarts)
            last = found.last_preserved if found.last_preserved is not None else time.time() - 1.0
            return found, last

        return self._comm.coordinator_only(f"listing the checkpoints in {directory}", find)

    def _adopt(self, found_last: tuple[steps.Found, float]) -> None:
        found, self._last_preserved = found_last
        self._entries: list[Entry] = found.tracked
        self._committed: list[Entry] = found.committed

    def _begin(self, call: str) -> None:
        if self._closed:
            raise FailedPreconditionError(f"CheckpointManager.{call}: the manager is closed")
        self._comm.begin(f"CheckpointManager.{call}")

    def _info(self, msg: str, *args: Any) -> None:
        if self._comm.is_coordinator:  # every rank agrees; one line per event
            log.info(msg, *args)

    # ------------------------------------------------------------------------ save
    def should_save(self, step: int) -> bool:
        """Collective: whether to save at ``step``: every ``save_interval_steps`` steps, or
        once at the first step boundary after any rank got a preemption notice; never twice
        for the same step (the one restored included)."""
        step = _step(step)
        self._begin("should_save")
        preempted = self._watcher.agreed(self._comm, step)
        self._polled = (step, preempted)
        done = self._saved | ({self._pending.step} if self._pending is not None else set())
        if step in done:
            return False
        # a notice asks for one save (at the step agreed, or the first asked about after it)
        urgent = preempted and not any(s >= self._watcher.agreed_step for s in done)
        return urgent or step % self.save_interval_steps == 0

    def reached_preemption(self, step: int) -> bool:
        """Collective: whether the ranks agreed on a preemption notice by ``step`` (the same
        answer ``should_save(step)`` acted on, when it was asked about this step)."""
        step = _step(step)
        if self._polled is not None and self._polled[0] == step:
            return self._polled[1]
        self._begin("reached_preemption")
        return self._watcher.agreed(self._comm, step)

    def save(
        self,
        step: int,
        metrics: dict | None = None,
        metadata: dict | None = None,
        state: Any = None,
        *,
        blocking: bool = False,
    ) -> SaveHandle | str:
        """Collective: save ``<directory>/<checkpoint_name>-<step>``, with ``metrics`` (for
        ``best_metric``) and ``metadata`` (a JSON dict, back from :meth:`metadata`) in it.

        Non-blocking by default: returns the Saver's :class:`SaveHandle` once the state is
        copied; the next save, a restore, :meth:`wait_until_finished`, :meth:`close` and
        interpreter exit join it. ``state``: a new tree for a tree state (immutable leaves,
        e.g. JAX's) assigned before saving. Checkpoints of later steps (a timeline left by
        restoring an older one) are deleted by this save's retention, but only after
        :meth:`restore_or_initialize`: without it a save below the newest step raises
        ``FailedPreconditionError`` (a loop that forgot to resume would delete them all).
        """
        step = _step(step)
        self._join_save()  # a drain goes on
        newest = max(self._steps(), default=-1)  # the same on every rank
        if step < newest and not self._resumed and not self._closed:
            raise FailedPreconditionError(
                f"CheckpointManager.save({step}): {self.directory} holds step {newest}, later than "
                f"{step}; call restore_or_initialize() first (its save then replaces the later "
                "checkpoints) or save a later step; nothing was written or deleted"
            )
        self._begin("save")
        key = {"step": step, "blocking": bool(blocking), "metadata": metadata is not None}
        record = self._comm.every_rank(
            f"saving step {step} to {self.directory}",
            lambda: self._prepare(metrics, metadata, state),
            key=key,
        )
        prefix = steps.prefix_of(self.directory, self.checkpoint_name, step)
        pending = _Pending(step, prefix, None, {}, time.monotonic(), metrics=record[0])
        if self._fast is not None:
            preempted = self._watcher.agreed_step is not None and step >= self._watcher.agreed_step
            pending.persist = self._fast.persists(step, preempted)
            with gcpause.paused():
                pending.fast, result = self._fast.save(step, blocking, record[1])
        else:
            hook = self._retention_hook(step, record[0], pending.outcome)
            with gcpause.paused():
                result = self._saver._save(prefix, None, "checkpoint", True, blocking, record[1], hook)
        pending.handle = result if isinstance(result, SaveHandle) else None
        self._pending = pending
        if blocking:  # a drain it starts goes on in the background
            self._join_save()
        return result

    def _prepare(self, metrics: dict | None, metadata: dict | None, state: Any) -> tuple[dict, dict]:
        """This rank's checks of a save's arguments: (plain metrics, metadata to store)."""
        plain = steps.plain_metrics(metrics)
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidArgumentError(f"metadata must be a dict, not {type(metadata).__name__}")
        if metadata and steps.MANAGER_KEY in metadata:
            raise InvalidArgumentError(f"metadata key {steps.MANAGER_KEY!r} is reserved for the manager")
        if state is not None:
            tree = getattr(self._saver, "state", None)
            if tree is None:
                raise InvalidArgumentError(
                    "save(state=...) needs a manager made from a nested mapping of arrays; this one "
                    "saves the variables of its Saver (update them instead)"
                )
            tree.assign(state)
        return plain, {**(metadata or {}), steps.MANAGER_KEY: {"metrics": plain}}

    def _retention_hook(self, step: int, metrics: dict, outcome: dict):
        """The Saver's retention for this save: the manager's policy on what it tracks (the
        same on every rank), recorded in ``outcome`` for :meth:`wait_until_finished`."""
        earlier = [e for e in self._entries if e.step < step]
        later = [e for e in self._entries if e.step > step]
        policy, last = self._policy, self._last_preserved

        def retain(_checkpoints: list, prefix: str, timestamp: float) -> retention.Retained:
            out = retention_policy.keep(policy, earlier + [Entry(step, prefix, timestamp, metrics)], last)
            out = retention_policy.Outcome(out.kept, out.doomed + later, out.preserved, out.last_preserved)
            outcome["outcome"] = out
            return retention.Retained(
                [(e.prefix, e.timestamp) for e in out.kept],
                [e.prefix for e in out.doomed],
                float("inf"),
                out.last_preserved,
            )

        return retain

    def wait_until_finished(self) -> None:
        """Wait for the pending save and a running drain, if any; raise their errors (on
        every rank alike)."""
        self._join_save()
        self._join_drain()
        error, self._drain_error = self._drain_error, None
        if error is not None:
            raise error

    def _join_save(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.handle is not None:
            pending.handle.result()
        if pending.fast is None:
            self._fold(pending)
            return
        self._fast.saved(pending.fast, pending.metrics)
        self._saved.add(pending.step)
        self._info(
            "CheckpointManager: saved step %d to the fast tier in %.3f s",
            pending.step,
            time.monotonic() - pending.started,
        )
        if pending.persist:
            self._drain(pending)

    def _drain(self, pending: _Pending) -> None:
        """Start draining a fast-tier step to the durable tier (after the last drain, whose
        error, logged now, is raised by the next :meth:`wait_until_finished`)."""
        self._join_drain(keep_error=True)
        drain = _Pending(pending.step, pending.prefix, None, {}, time.monotonic())
        hook = self._retention_hook(pending.step, pending.metrics or {}, drain.outcome)
        self._fast.start_drain(pending.step, pending.prefix, hook, self._storage_options, self._fs)
        self._draining = drain

    def _join_drain(self, keep_error: bool = False) -> None:
        drain, self._draining = self._draining, None
        if drain is None:
            return
        try:
            self._fast.join_drain()
        except ShardsaveError as exc:  # the same on every rank (the drain's steps agree)
            if not keep_error:
                raise
            log.error("CheckpointManager: draining step %d to %s failed: %s", drain.step, drain.prefix, exc)
            self._drain_error = self._drain_error or exc
            return
        self._fold(drain)

    def _steps(self) -> list[int]:
        """The steps of both tiers, oldest first."""
        fast = self._fast.steps if self._fast is not None else []
        return sorted({e.step for e in self._entries} | set(fast))

    def _fold(self, pending: _Pending) -> None:
        """A durable save (or drain) committed: adopt its retention's outcome."""
        out: retention_policy.Outcome = pending.outcome["outcome"]
        self._entries = out.kept
        self._last_preserved = out.last_preserved
        gone = {e.step for e in out.doomed}
        self._committed = sorted(
            [e for e in self._committed if e.step not in gone and e.step != pending.step]
            + [e for e in out.kept if e.step == pending.step],
            key=lambda e: e.step,
        )
        self._saved.add(pending.step)
        self._metadata.pop(pending.step, None)
        self._info(
            "CheckpointManager: saved step %d to %s in %.3f s on %d ranks",
            pending.step,
            pending.prefix,
            time.monotonic() - pending.started,
            self._comm.size,
        )
        for e in out.doomed:  # the save's coordinator logged "retention deleted" for each
            self._metadata.pop(e.step, None)

    # --------------------------------------------------------------------- restore
    def restore_or_initialize(self) -> int | None:
        """Collective: restore the newest checkpoint that restores and return its step; a
        damaged or incomplete one is logged (WARNING, with the error) and the next older is
        tried. None (the state left as it is) when none restores or there is none.

        With a fast tier, the newest step of either tier; for that step the fast tier
        (its files wherever they survive in the job, lost ones rebuilt from partner copies
        or parity, every copy checked first), then the durable tier. ``restored_from``
        says where each rank's data came from (resume.py)."""
        self.wait_until_finished()
        self._begin("restore_or_initialize")
        self._resumed = True
        self._adopt(self._find())
        return resume.restore_newest(self)

    # --------------------------------------------------------------------- queries
    def latest_step(self) -> int | None:
        """The newest step kept in either tier (after the pending save finishes), or None."""
        self.wait_until_finished()
        return max(self._steps(), default=None)

    def all_steps(self) -> list[int]:
        """The steps retention keeps in either tier (oldest first), after the pending save
        finishes."""
        self.wait_until_finished()
        return self._steps()

    def best_step(self) -> int | None:
        """The kept step with the best ``metrics[best_metric]``; None without a best
        metric or when no kept checkpoint has it."""
        self.wait_until_finished()
        scored = [(self._policy.score(e), e.step) for e in self._entries]
        scored = [(s, step) for s, step in scored if s is not None]
        return max(scored)[1] if scored else None

    def metadata(self, step: int) -> dict | None:
        """The ``metadata`` dict saved with ``step`` (read from the checkpoint), or None
        if it was saved without any (or with an empty one: the checkpoint also holds the
        manager's own record, so the two are not told apart)."""
        step = _step(step)
        self.wait_until_finished()
        if step not in self._metadata:
            prefix = steps.prefix_of(self.directory, self.checkpoint_name, step)
            meta = read_metadata(prefix, storage_options=self._storage_options, fs=self._fs)
            if meta is not None:
                meta = {k: v for k, v in meta.items() if k != steps.MANAGER_KEY} or None
            self._metadata[step] = meta
        return self._metadata[step]

    # ------------------------------------------------------------------------ close
    def close(self, persist: bool = False) -> None:
        """Collective: wait for the pending save and drain, remove the signal handlers,
        free the manager's communicators (and the Saver's, if the manager made it).
        ``persist``: first drain the newest fast-tier step saved, if the durable tier lacks it."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
            last = self._fast.last if self._fast is not None else None
            if persist and last is not None and last.step not in self._fast.drained:
                prefix = steps.prefix_of(self.directory, self.checkpoint_name, last.step)
                self._drain(
                    _Pending(last.step, prefix, None, {}, time.monotonic(), metrics=self._fast.last_metrics)
                )
                self._join_drain()
        finally:
            self._watcher.close()
            if self._fast is not None:
                self._fast.close()
            self._comm.close()
            if self._owns_saver:
                self._saver.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or not 0 <= step < 2**63:
        raise InvalidArgumentError(f"step must be a non-negative int below 2**63, not {step!r}")
    return int(step)
