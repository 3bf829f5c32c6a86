"""The manager's restart: the newest step that restores, from either tier.

For each step, newest first: the fast tier (tiers/restart.py) if it holds the step, then
the durable tier; a step none of whose sources works is logged (WARNING) and the next
older one is tried. ``manager.restored_from`` records where the data came from: ``step``,
``tier`` ("fast" or "durable"), ``files`` (per saving rank: ``source`` data, partner,
rebuilt or durable, and the ``node``), ``fallbacks`` (why newer steps or faster sources
were not used) and ``bytes_read`` by this rank.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import DataLossError, NotFoundError
from ..tiers.restart import Unrestorable
from .policy import Entry

if TYPE_CHECKING:
    from .manager import CheckpointManager

log = logging.getLogger("shardsave")

FALLBACK_ERRORS = (DataLossError, NotFoundError)
"""A checkpoint that raises one of these on restore is damaged or incomplete (a file
missing, a checksum wrong): the manager falls back to the next older one. Others are
raised: a shape that does not match or a variable the checkpoint lacks is the caller's
state, not the checkpoint (falling back to older ones, then starting afresh and letting
retention delete them, would be the wrong cure); a storage error (access denied) is the
storage's."""


def _damaged(exc: BaseException) -> bool:
    """Whether a restore's error says the checkpoint is damaged or incomplete."""
    return isinstance(exc, FALLBACK_ERRORS) and " not found in checkpoint" not in str(exc)


def restore_newest(self: CheckpointManager) -> int | None:
    """After the manager listed its directory: restore the newest step that restores."""
    durable = {e.step: e for e in self._committed}
    inv = self._fast.inventory() if self._fast is not None else None
    fast = set(inv.manifests) if inv is not None else set()
    fallbacks: list[str] = []  # why newer steps, or faster sources, were not used
    for step in sorted(fast | set(durable), reverse=True):
        started = time.monotonic()
        if step in fast:
            try:
                self.restored_from, self.restored_state = self._fast.restore(inv, step)
                self.restored_from["fallbacks"] = list(fallbacks)
            except Unrestorable as exc:
                fallbacks.append(f"step {step}, fast tier: {exc}")
                _warn(self, "CheckpointManager: step %d does not restore from the fast tier: %s", step, exc)
            else:
                return _restored(self, step, "the fast tier", started)
        if step in durable and _restore_durable(self, durable[step], fallbacks):
            return _restored(self, step, durable[step].prefix, started)
    self._info("CheckpointManager: no checkpoint of %s restores; starting fresh", self.directory)
    return None


def _restore_durable(self: CheckpointManager, entry: Entry, fallbacks: list[str]) -> bool:
    try:
        self.restored_state = self._saver.restore(entry.prefix)
    except FALLBACK_ERRORS as exc:
        if self._saver.comm.broken or not _damaged(exc):
            raise
        _warn(
            self,
            "CheckpointManager: checkpoint %s (step %d) does not restore, trying the next older one: %s: %s",
            entry.prefix,
            entry.step,
            type(exc).__name__,
            exc,
        )
        return False
    stats = self._saver.last_restore_stats
    self.restored_from = {
        "step": entry.step,
        "tier": "durable",
        "files": [{"rank": None, "source": "durable", "node": None}],
        "fallbacks": fallbacks,
        "bytes_read": stats.bytes_read if stats is not None else None,
    }
    return True


def _restored(self: CheckpointManager, step: int, where: str, started: float) -> int:
    self._saved.add(step)
    self.restored_from.setdefault("fallbacks", [])
    self._info(
        "CheckpointManager: restored step %d from %s in %.3f s on %d ranks",
        step,
        where,
        time.monotonic() - started,
        self._comm.size,
    )
    return step


def _warn(self: CheckpointManager, msg: str, *args: Any) -> None:
    if self._comm.is_coordinator:
        log.warning(msg, *args)
