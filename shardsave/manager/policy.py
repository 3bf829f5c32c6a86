"""Which checkpoints a manager keeps: pure functions of what is known about them, so every
rank computes the same outcome, and a restarted job continues what earlier ones began.

Without a best metric, TF2's ``tf.train.CheckpointManager``: the ``max_to_keep`` newest
stay listed; an older one leaves the list and is deleted, unless
``keep_checkpoint_every_n_hours`` has passed since the last one preserved: it then stays
on disk for good, off the list (never deleted by a manager again).

With a best metric (``best_mode`` "min" or "max"): the ``max_to_keep`` best by it stay,
and the newest always does too (a restart resumes from it), so up to ``max_to_keep + 1``
are kept; a checkpoint without that metric ranks below every one with it, ties go to the
newer. The others leave as above (preserved, or deleted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Entry:
    """One checkpoint the manager tracks."""

    step: int
    prefix: str
    timestamp: float
    metrics: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Policy:
    max_to_keep: int | None = 5
    every_n_hours: float | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    def __post_init__(self):
        if self.max_to_keep is not None and (
            isinstance(self.max_to_keep, bool)
            or not isinstance(self.max_to_keep, int)
            or self.max_to_keep < 1
        ):
            raise InvalidArgumentError(
                f"max_to_keep must be a positive int or None, not {self.max_to_keep!r}"
            )
        if self.best_mode not in ("min", "max"):
            raise InvalidArgumentError(f"best_mode must be 'min' or 'max', not {self.best_mode!r}")
        if self.every_n_hours is not None and not self.every_n_hours > 0:
            raise InvalidArgumentError(
                f"keep_checkpoint_every_n_hours must be a positive number or None, not {self.every_n_hours!r}"
            )

    def score(self, entry: Entry) -> float | None:
        """The entry's metric as a number where larger is better, or None without one."""
        value = entry.metrics.get(self.best_metric) if self.best_metric else None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return None
        return float(value) if self.best_mode == "max" else -float(value)


@dataclass(frozen=True)
class Outcome:
    kept: list[Entry]  # by step, the newest last: the state file lists them
    doomed: list[Entry]  # to delete
    preserved: list[Entry]  # off the list, kept on disk for keep_checkpoint_every_n_hours
    last_preserved: float


def keep(policy: Policy, entries: list[Entry], last_preserved: float) -> Outcome:
    """What ``policy`` keeps of ``entries`` (any order); ``last_preserved``: the timestamp
    of the last checkpoint preserved for ``keep_checkpoint_every_n_hours`` (TF2's)."""
    entries = sorted({e.step: e for e in entries}.values(), key=lambda e: e.step)
    if policy.max_to_keep is None or len(entries) <= policy.max_to_keep:
        return Outcome(entries, [], [], last_preserved)
    if policy.best_metric is None:
        chosen = {e.step for e in entries[-policy.max_to_keep :]}
    else:
        ranked = sorted(entries, key=lambda e: (policy.score(e) is not None, policy.score(e) or 0.0, e.step))
        chosen = {e.step for e in ranked[-policy.max_to_keep :]} | {entries[-1].step}
    kept, doomed, preserved = [], [], []
    for e in entries:
        if e.step in chosen:
            kept.append(e)
        elif policy.every_n_hours and e.timestamp - policy.every_n_hours * 3600 >= last_preserved:
            last_preserved = e.timestamp
            preserved.append(e)
        else:
            doomed.append(e)
    return Outcome(kept, doomed, preserved, last_preserved)
