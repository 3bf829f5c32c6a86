"""Preemption notices: SIGTERM (Slurm and Kubernetes send it before killing a job) and
SIGUSR1 (Slurm's ``--signal``) set a flag on the rank that got them; the ranks agree on it
at a step boundary, so every rank sees the notice at the same step.

The handler runs in the main thread (Python's rule) and only sets the flag, then chains to
the handler that was installed before it, if that was a Python function. ``close`` puts the
previous handlers back.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

from .._comm import Comm

log = logging.getLogger("shardsave")

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Watches for preemption signals on this rank; :meth:`agreed` tells every rank
    whether any rank was notified (collective)."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._notified = threading.Event()
        self._agreed_step: int | None = None
        self.signal_received: int | None = None

    def install(self) -> PreemptionWatcher:
        """Install the handlers; outside the main thread nothing is installed (Python
        allows signal handlers only there) and only :meth:`notify` sets the flag."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("preemption: not the main thread, no signal handler installed")
            return self
        for signum in self._signals:
            if signum in self._previous:
                continue
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.notify(signum)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def notify(self, signum: int | None = None) -> None:
        """Mark this rank as notified (what the signal handler does)."""
        if not self._notified.is_set():
            self.signal_received = signum
        self._notified.set()

    @property
    def notified(self) -> bool:
        """Whether this rank got a notice (no communication)."""
        return self._notified.is_set()

    @property
    def agreed_step(self) -> int | None:
        """The step at which the ranks agreed on a notice, or None."""
        return self._agreed_step

    def agreed(self, comm: Comm, step: int) -> bool:
        """Collective: whether any rank has been notified, by now. Once true it stays
        true, for the step it first became true at, without communicating again."""
        if self._agreed_step is not None:
            return step >= self._agreed_step
        anyone = not comm.all_true(not self.notified)
        if anyone:
            self._agreed_step = step
            log.info("preemption notice agreed by every rank at step %d", step)
        return anyone

    def close(self) -> None:
        """Put back the handlers that were installed before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
