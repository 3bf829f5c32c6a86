"""Collectives: the only module that touches mpi4py.

:class:`Comm` wraps a duplicate of the caller's communicator, so shardsave's messages never
mix with the application's, and has a fast path for a single process that never imports
MPI. :meth:`Comm.agree` is how every collective call ends: each rank reports its own
exception (or none) and, if any rank failed, every rank raises the same error naming the
failed ranks, so no rank waits forever for one that gave up.
"""

from __future__ import annotations

import contextlib
from typing import Any

from . import errors


class Comm:
    """A communicator of ``size`` ranks (size 1 needs no MPI)."""

    def __init__(self, mpi_comm: Any = None):
        self._comm = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()

    @classmethod
    def create(cls, comm: Any = None) -> Comm:
        """Duplicate ``comm`` (default ``MPI.COMM_WORLD``); a single process gets no MPI."""
        if isinstance(comm, Comm):
            return comm
        if comm is None:
            try:
                from mpi4py import MPI
            except ImportError:
                return cls(None)
            comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            return cls(None)
        return cls(comm.Dup())

    @property
    def thread_multiple(self) -> bool:
        """Whether background threads may make MPI calls while the application does."""
        if self._comm is None:
            return True
        from mpi4py import MPI

        return MPI.Query_thread() >= MPI.THREAD_MULTIPLE

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj if self._comm is None else self._comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj] if self._comm is None else self._comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return [obj] if self._comm is None else self._comm.allgather(obj)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if self._comm is None:
            return flag
        from mpi4py import MPI

        return self._comm.allreduce(bool(flag), op=MPI.LAND)

    def barrier(self) -> None:
        if self._comm is not None:
            self._comm.Barrier()

    def agree(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank if ``error`` is set on any rank; return if none failed."""
        if self._comm is None:
            if error is not None:
                raise error
            return
        reports = self._comm.allgather(None if error is None else _describe(error))
        failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        if not failed:
            return
        raise combined_error(failed, what) from error

    def free(self) -> None:
        if self._comm is not None:
            with contextlib.suppress(Exception):  # MPI may already be finalized at exit
                self._comm.Free()
            self._comm = None


def _describe(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error) or repr(error)


def combined_error(failed: list[tuple[int, tuple[str, str]]], what: str) -> errors.ShardsaveError:
    """One error for all ranks: the failures' own class if they agree on one, else Aborted."""
    kinds = {kind for _, (kind, _) in failed}
    cls: type[errors.ShardsaveError] = errors.AbortedError
    if len(kinds) == 1:
        cls = getattr(errors, kinds.pop(), None) or errors.AbortedError
        if not (isinstance(cls, type) and issubclass(cls, errors.ShardsaveError)):
            cls = errors.AbortedError
    ranks = ", ".join(str(rank) for rank, _ in failed)
    reasons = "; ".join(f"rank {rank}: {kind}: {msg}" for rank, (kind, msg) in failed)
    return cls(f"{what} failed on rank(s) {ranks}: {reasons}")
