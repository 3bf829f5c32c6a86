"""Collectives: the only module that touches mpi4py.

:class:`Comm` wraps a duplicate of the caller's communicator, so shardsave's messages never
mix with the application's, and has a fast path for a single process that never imports
MPI. :meth:`Comm.agree` is how every collective call ends: each rank reports its own
exception (or none) and, if any rank failed, every rank raises the same error naming the
failed ranks, so no rank waits forever for one that gave up.
"""

from __future__ import annotations

import contextlib
import os
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
            except (ImportError, RuntimeError) as exc:  # RuntimeError: no MPI library to load
                return cls._without_mpi(exc)
            comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            return cls(None)
        return cls(comm.Dup())

    @classmethod
    def _without_mpi(cls, exc: BaseException) -> Comm:
        """One rank when MPI cannot be loaded, unless a launcher started several."""
        launched = launched_ranks()
        if launched is None:
            return cls(None)
        name, size = launched
        reason = ": ".join(line for line in str(exc).splitlines() if line) or type(exc).__name__
        raise errors.FailedPreconditionError(
            f"{name}={size} says this process is one of {size} ranks, but MPI cannot be used "
            f"({reason}); install the MPI extra (pip install 'shardsave[mpi]') or an MPI library "
            "that mpi4py can load (see MPI4PY_LIBMPI), or run one process without a launcher"
        ) from exc

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


LAUNCHER_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "SLURM_STEP_NUM_TASKS")
"""Variables in which MPI launchers tell a process how many ranks they started: MPICH's
and Intel MPI's Hydra and PMI (``PMI_SIZE``; ``MPI_LOCALNRANKS``, the ranks on this node),
Open MPI, MVAPICH2, Slurm's ``srun`` (``SLURM_STEP_NUM_TASKS``). Not ``SLURM_NTASKS``: a
batch script has it too, and it is one process that may save on its own."""


def launched_ranks() -> tuple[str, int] | None:
    """``(variable, size)`` if a launcher says this process is one of several ranks."""
    for name in LAUNCHER_SIZES:
        try:
            size = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if size > 1:
            return name, size
    return None


def _describe(error: BaseException) -> tuple[str, str, int | None, str | None]:
    """What a rank tells the others about its error: class name, message, and for a
    :class:`~shardsave.errors.StorageError` its errno and file (else None)."""
    storage = isinstance(error, errors.StorageError)
    return (type(error).__name__, str(error) or repr(error),
            error.errno if storage else None, error.filename if storage else None)


def combined_error(failed: list[tuple[int, tuple]], what: str) -> errors.ShardsaveError:
    """One error for all ranks: the failures' own class if they agree on one (the closest
    common :class:`~shardsave.errors.StorageError` class if they are all storage errors,
    with the errno and file they agree on), else :class:`~shardsave.errors.AbortedError`.

    ``failed`` holds ``(rank, report)`` with each report from :func:`_describe`."""
    cls = _common_class({report[0] for _, report in failed})
    ranks = ", ".join(str(rank) for rank, _ in failed)
    reasons = "; ".join(f"rank {rank}: {report[0]}: {report[1]}" for rank, report in failed)
    message = f"{what} failed on rank(s) {ranks}: {reasons}"
    if not issubclass(cls, errors.StorageError):
        return cls(message)
    code = _agreed(report[2] if len(report) > 2 else None for _, report in failed)
    filename = _agreed(report[3] if len(report) > 3 else None for _, report in failed)
    return cls(message, code, os.strerror(code) if code is not None else None, filename)


def _common_class(kinds: set[str]) -> type[errors.ShardsaveError]:
    classes = [getattr(errors, kind, None) for kind in kinds]
    if not all(isinstance(c, type) and issubclass(c, errors.ShardsaveError) for c in classes):
        return errors.AbortedError
    if len(classes) == 1:
        return classes[0]
    if all(issubclass(c, errors.StorageError) for c in classes):
        return next(c for c in classes[0].__mro__ if all(issubclass(o, c) for o in classes))
    return errors.AbortedError


def _agreed(values) -> Any:
    """The value if every one is the same, else None."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None
