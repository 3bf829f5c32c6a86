"""Restore into the variables' own arrays in one pass: ``Saver(restore_in_place="direct")``.

The default in-place restore (in_place.py) reads every byte twice, a check pass and then a
fill pass, so that damage found anywhere changes no variable. When a node's checkpoint does
not fit in its page cache, or the filesystem does not cache, the disk reads it twice. Here
each range is read once, straight into place (or through a small buffer or a slab of rows
where the target is not contiguous in the file), and checked as it lands, by the same
reads as a restore into new arrays (fresh.py). Every byte used is still verified.

The price is atomicity: damage is found after bytes have landed. The error then says, of
this rank's variables read this way, which are partly overwritten (neither their old nor
their restored values), which were restored whole before the damage was found (on the
ranks that found none: all of them), and which are untouched; it carries the names as
attributes (``partly``, ``restored``, ``untouched``) for a caller that wants to
re-initialize or restore them again. Variables read into new arrays are never adopted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import storage
from ..errors import DataLossError, ShardsaveError
from ..format.index import Index
from .checks import DataFiles
from .fresh import Landing, load
from .reads import LoadStats, Target
from .small import InPlace, load_small

LISTED = 20
"""Names listed per kind in the message (all of them are in the error's attributes)."""


class Direct:
    """This rank's single-pass reads, and what they left in its variables' arrays, by
    name: ``partly`` overwritten, ``restored`` whole, ``untouched``. A failed restore's
    error (raised by every rank, naming the rank that failed) is given this rank's own
    account by :meth:`explain`."""

    def __init__(
        self,
        targets: Sequence[Target],
        small_names: Sequence[str] = (),
        small_arrays: Sequence[np.ndarray] = (),
    ):
        self.targets = targets
        self.small_names, self.small_arrays = small_names, small_arrays
        """Whole small tensors, read in bulk straight into their variables' arrays."""
        self.partly: list[str] = []
        self.restored: list[str] = []
        self.untouched = [t.name for t in targets] + list(small_names)

    def load(self, prefix: storage.Location, index: Index, stats: LoadStats, files: DataFiles) -> None:
        """Read and check every byte the targets need straight into their arrays."""
        landing = Landing()
        try:
            if self.small_names:
                landing.plan_each(range(len(self.targets), len(self.targets) + len(self.small_names)))
                into = InPlace(self.small_arrays, landing, len(self.targets))
                load_small(prefix, index, self.small_names, stats, files, into)
            load(prefix, index, self.targets, stats, files, landing)
        except Exception:
            self._account(landing)
            raise
        self.partly, self.restored, self.untouched = [], self.untouched, []

    def _account(self, landing: Landing) -> None:
        self.partly, self.restored, self.untouched = [], [], []
        for i, name in enumerate([t.name for t in self.targets] + list(self.small_names)):
            if i not in landing.touched:
                self.untouched.append(name)
            elif landing.done(i):
                self.restored.append(name)
            else:
                self.partly.append(name)

    def explain(self, exc: Exception, rank: int) -> Exception:
        """``exc`` (the restore's error on this rank) saying what this rank's reads left
        behind, as its message and attributes."""
        if self.partly or self.restored:
            account = (
                f"so on rank {rank} variables were written before this was found: partly "
                f"overwritten, holding neither their old nor their restored values: "
                f"{_names(self.partly)}; restored whole: {_names(self.restored)}; untouched: "
                f"{_names(self.untouched)}"
            )
        else:
            account = f"but on rank {rank} no variable was written"
        message = f"{exc}; restoring in place in one pass (restore_in_place='direct'), {account}"
        error = type(exc)(message) if isinstance(exc, ShardsaveError) else DataLossError(message)
        error.partly, error.restored, error.untouched = self.partly, self.restored, self.untouched
        return error


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(map(repr, names[:LISTED]))
    return shown if len(names) <= LISTED else f"{shown} and {len(names) - LISTED} more"
