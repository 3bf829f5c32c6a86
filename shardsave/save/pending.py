"""Pending non-blocking saves: the handle a caller waits on, and joining them at exit."""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from typing import Any


class SaveHandle:
    """The pending result of ``Saver.save(..., blocking=False)``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._done = threading.Event()
        self._result: str | None = None
        self._error: BaseException | None = None
        self._error_seen = False

    def _run(self, fn, *args) -> None:
        try:
            self._result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._error = exc
        finally:
            self._done.set()

    def _join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _wait(self) -> None:
        """Wait for the save; raise its error if nobody has seen it yet."""
        self._join()
        if self._error is not None and not self._error_seen:
            self._error_seen = True
            raise self._error

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> str:
        """The prefix once the save has committed; raises the save's error."""
        if not self._join(timeout):
            raise TimeoutError(f"save of {self.prefix} still running after {timeout}s")
        if self._error is not None:
            self._error_seen = True
            raise self._error
        return self._result

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else "done")
        return f"<SaveHandle {self.prefix} {state}>"


_exit_joins: weakref.WeakSet = weakref.WeakSet()


def register_exit_join(saver: Any) -> None:
    """Make sure ``saver``'s pending save is finished before the interpreter exits."""
    if not _exit_joins:
        # threading's own exit hooks run before concurrent.futures stops accepting work
        # (the save's I/O threads need it) and before MPI is finalized; plain atexit
        # would be too late for both.
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_join_all_at_exit)
    _exit_joins.add(saver)


def _join_all_at_exit() -> None:
    """Finish pending background saves before the interpreter (and MPI) shut down."""
    for saver in list(_exit_joins):
        try:
            saver.wait_until_finished()
        except BaseException as exc:  # noqa: BLE001 - nobody is left to raise to
            print(f"shardsave: a background save failed: {exc}", file=sys.stderr)
