"""Collectives: the only module that touches mpi4py.

:class:`Comm` wraps a duplicate of the caller's communicator, so shardsave's messages never
mix with the application's, and has a fast path for a single process that never imports
MPI. :meth:`Comm.agree` is how every collective step ends: each rank reports its own
exception (or none) and, if any rank failed, every rank raises the same error naming the
failed ranks, so no rank waits forever for one that gave up.

``agree`` is built from point-to-point messages, not a blocking all-gather, so that it can
give up: every rank sends its report (its error, the call and step it is in, and at the
first step of a call a key such as the prefix) to the coordinator, which polls until all
have arrived or ``timeout`` seconds have passed, combines them and sends every rank the
same verdict. A rank that never arrives (``if rank == 0: saver.save(...)``) thus costs the
others at most ``timeout`` seconds and a :class:`~shardsave.errors.DeadlineExceededError`
naming it. ``all_true`` is such a step too. The pickled collectives (``bcast``,
``gather``, ``allgather``, ``scatter``: bounded.py) are bounded by ``timeout`` as well,
though they are used right after a successful step, when every rank is known to have
been there. After a deadline the ranks may be at different steps, so the communicator is
marked broken and refuses further use.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .. import errors
from .._reports import describe, rebuild
from .verdict import Report, Verdict, decide, expected

T = TypeVar("T")

REPORT_TAG = 0x5A501
"""Tag of the reports ranks send the coordinator in ``agree`` (on the duplicate only)."""
VERDICT_TAG = 0x5A502
"""Tag of the coordinator's verdicts."""
SPIN = 0.05
"""For this long (seconds) a waiting rank polls without sleeping, only yielding its core
(as MPICH's own blocking calls do): on a busy machine a sleep's wake-up costs milliseconds,
and most agrees find every rank there within a few. Measured on 2 loaded cores, 2-8 ranks:
an agree costs about what the all-gather it replaces did with this, 5-50x more with 2 ms."""
MAX_PAUSE = 0.01
"""After SPIN, the longest sleep between two polls for the first second; then LONG_PAUSE:
a long wait (the coordinator committing to S3) must not burn the cores ranks share."""
LONG_PAUSE = 0.05
COLLECTIVE_SPIN = 1.0
"""How long the pickled collectives (bounded.py) poll without sleeping: they follow a step
every rank passed. With SPIN, a 64-rank save took 2.0-2.5 s against 1.4-1.9 s with MPI's
blocking calls (oversubscribed ranks sleeping 10 ms at a time); with this, the same."""


class Comm:
    """A communicator of ``size`` ranks (size 1 needs no MPI).

    ``timeout`` (seconds, None = forever) bounds every wait of :meth:`agree`.
    """

    def __init__(self, mpi_comm: Any = None, timeout: float | None = None, *, owned: bool = False):
        self._comm = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.timeout = timeout
        self.call = "a shardsave call"
        self._what = self.call  # of the last agree, for the steps that have none of their own
        self._step = 0
        self._broken: str | None = None  # why, once a deadline passed
        self._sends: list[Any] = []  # verdict/report sends not yet known complete
        self._ahead: dict[int, list[Any]] = {}  # gathered early, for the next gather (bounded.py)
        self._closed = False
        # a communicator this Comm duplicated is freed when it is closed or collected
        self._free = (
            weakref.finalize(self, _free, mpi_comm) if owned and mpi_comm is not None else lambda: None
        )

    @classmethod
    def create(cls, comm: Any = None, timeout: float | None = None) -> Comm:
        """Duplicate ``comm`` (default ``MPI.COMM_WORLD``); a single process gets no MPI.

        Duplicating is collective: with a ``timeout`` it waits at most that long for every
        rank of ``comm`` to take part. A :class:`Comm` is returned as it is.
        """
        if isinstance(comm, Comm):
            return comm
        if comm is None:
            try:
                from mpi4py import MPI
            except (ImportError, RuntimeError) as exc:  # RuntimeError: no MPI library to load
                return cls._without_mpi(exc, timeout)
            comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            return cls(None, timeout)
        return cls(_duplicate(comm, timeout), timeout, owned=True)

    @classmethod
    def _without_mpi(cls, exc: BaseException, timeout: float | None) -> Comm:
        """One rank when MPI cannot be loaded, unless a launcher started several."""
        launched = launched_ranks()
        if launched is None:
            return cls(None, timeout)
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

    @property
    def broken(self) -> bool:
        """Whether a deadline passed, leaving the ranks at unknown steps."""
        return self._broken is not None

    def begin(self, call: str) -> None:
        """Start the public collective call ``call`` (e.g. ``"Saver.save"``): its agrees are
        counted from 1 and a timeout names it as what the missing ranks should have called."""
        if self._closed:
            raise errors.FailedPreconditionError(f"{call}: this Saver is closed; construct a new one")
        self.call = call
        self._step = 0

    # pickled collectives, each wait bounded by ``timeout`` (bounded.py)
    def bcast(self, obj: Any, root: int = 0) -> Any:
        from . import bounded

        return obj if self._comm is None else bounded.bcast(self, obj, root, self._what)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        from . import bounded

        return [obj] if self._comm is None else bounded.gather(self, obj, root, self._what)

    def allgather(self, obj: Any) -> list[Any]:
        from . import bounded

        return [obj] if self._comm is None else bounded.allgather(self, obj, self._what)

    def scatter(self, objs: list[Any] | None, root: int = 0) -> Any:
        """``objs[rank]`` (given on ``root`` only) to each rank."""
        from . import bounded

        if self._comm is None:
            return objs[0] if objs else None
        return bounded.scatter(self, objs, root, self._what)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if self._comm is None:
            return flag
        # a step of its own, bounded like agree: it is the first collective of the background
        # part of a non-blocking save, which a rank that failed to stage never reaches
        return self._round(None, self._what, None, bool(flag))

    def every_rank(self, what: str, step: Callable[[], T], *, key: dict | None = None) -> T:
        """Run ``step`` on this rank, then agree on the outcome (as PyTorch DCP's
        ``_DistWrapper`` does): its result if it succeeded on every rank, else every rank
        raises the same combined error. ``key``: see :meth:`agree`."""
        result, error = None, None
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            error = exc
        self.agree(error, what, key=key)
        return result

    def coordinator_only(self, what: str, step: Callable[[], T], *, key: dict | None = None) -> T:
        """Run ``step`` on the coordinator alone; every rank gets its result, or raises
        its error (``key``: see :meth:`agree`)."""
        return self.bcast(self.coordinator_step(what, step, key=key))

    def coordinator_step(self, what: str, step: Callable[[], T], *, key: dict | None = None) -> T | None:
        """Run ``step`` on the coordinator alone and agree on its outcome: its result on
        the coordinator, None elsewhere (the caller sends it on), or its error on every rank."""
        result, error = None, None
        if self.is_coordinator:
            try:
                result = step()
            except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
                error = exc
        self.agree(error, what, key=key)
        return result

    def agree(self, error: BaseException | None, what: str, *, key: dict | None = None) -> None:
        """Raise on every rank if ``error`` is set on any rank; return if none failed.

        ``key`` (a dict of plain values), if given, must be equal on every rank, else every
        rank raises InvalidArgumentError naming the ranks and their values. Waits at most
        ``timeout`` seconds for the other ranks (DeadlineExceededError naming the missing).
        """
        if self._comm is None:
            if error is not None:
                raise error
            return
        self._what = what
        self._round(error, what, key, True)

    def _round(self, error: BaseException | None, what: str, key: dict | None, flag: bool) -> bool:
        """One bounded step: report to the coordinator, get its verdict; raise its error or
        return whether every rank's ``flag`` was true."""
        self._usable(what)
        self._step += 1
        now = time.time()
        gives_up_at = None if self.timeout is None else now + self.timeout + _grace(self.timeout)
        report = Report(
            self.rank,
            self.call,
            self._step,
            what,
            key,
            None if error is None else describe(error),
            gives_up_at,
            flag,
        )
        self._prune_sends()
        verdict_error, all_true = (
            self._coordinate(report) if self.is_coordinator else self._await_verdict(report)
        )
        if verdict_error is None:
            return all_true
        exc = rebuild(verdict_error)
        if isinstance(exc, errors.DeadlineExceededError):
            self._broken = str(exc)
        raise exc from error

    # ------------------------------------------------------------------ agree's parts
    def _coordinate(self, mine: Report) -> tuple[tuple | None, bool]:
        """Collect every rank's report (or give up at the deadline), decide, tell them all."""
        from mpi4py import MPI

        comm = self._comm
        reports = {0: mine}

        def all_arrived() -> bool:
            while (message := comm.improbe(source=MPI.ANY_SOURCE, tag=REPORT_TAG)) is not None:
                report = message.recv()
                reports[report.rank] = report
            return len(reports) == self.size

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        _poll(all_arrived, deadline)
        error = decide(mine, reports, self.size, self.timeout)
        all_true = all(r.flag for r in reports.values())
        for rank in range(1, self.size):  # the missing too: one that arrives late learns at once
            report = reports.get(rank)
            stamp = (report.call, report.step) if report else (mine.call, 0)
            self._sends.append(comm.isend(Verdict(*stamp, error, all_true), dest=rank, tag=VERDICT_TAG))
        return error, all_true

    def _await_verdict(self, mine: Report) -> tuple[tuple | None, bool]:
        comm = self._comm
        self._sends.append(comm.isend(mine, dest=0, tag=REPORT_TAG))
        got: list[Verdict] = []

        def verdict_arrived() -> bool:
            message = comm.improbe(source=0, tag=VERDICT_TAG)
            if message is not None:
                got.append(message.recv())
            return bool(got)

        waited = None if self.timeout is None else self.timeout + _grace(self.timeout)
        _poll(verdict_arrived, None if waited is None else time.monotonic() + waited)
        if not got:
            return (
                "DeadlineExceededError",
                (
                    f"{mine.what}: rank 0 (the coordinator) did not {expected(mine.call, mine.step)} "
                    f"within {waited:g} s"
                ),
            ), False
        verdict = got[0]
        if (verdict.call, verdict.step) != (mine.call, mine.step):  # left from a step this rank missed
            kind, message = (verdict.error or ("DeadlineExceededError", "the other ranks gave up"))[:2]
            return (
                kind,
                f"{mine.what}: the other ranks gave up waiting for this rank earlier: {message}",
            ), False
        return verdict.error, verdict.all_true

    # --------------------------------------------------------------------- plumbing
    def _usable(self, what: str | None = None) -> Any:
        if self._broken is not None:
            raise errors.FailedPreconditionError(
                f"{what or self.call}: this Saver's communicator is unusable since an earlier collective "
                f"step timed out ({self._broken}); its ranks may be at different steps. Construct a new "
                "Saver on every rank"
            )
        return self._comm

    def _prune_sends(self) -> None:
        self._sends = [req for req in self._sends if not req.Test()]

    def close(self) -> None:
        """Free the duplicated communicator (also done when the Comm is collected); any
        later call raises FailedPreconditionError."""
        self._closed = True
        self._free()


LAUNCHER_SIZES = (
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_STEP_NUM_TASKS",
)
"""Variables in which MPI launchers tell a process how many ranks they started: MPICH's
and Intel MPI's Hydra and PMI (``PMI_SIZE``; ``MPI_LOCALNRANKS``, the ranks on this node),
Open MPI, MVAPICH2, Slurm's ``srun`` (``SLURM_STEP_NUM_TASKS``). Not ``SLURM_NTASKS``: a
batch script has it too, and it is one process that may save on its own."""


_yield_core = getattr(os, "sched_yield", lambda: time.sleep(0))


def _grace(timeout: float) -> float:
    """How much longer than the coordinator a rank waits for its verdict: the coordinator
    waits ``timeout`` from its own arrival, which may be a little later."""
    return max(1.0, min(timeout, 30.0))


def _poll(ready: Callable[[], bool], deadline: float | None, spin: float = SPIN) -> bool:
    """Call ``ready`` until it is true or the ``deadline`` (monotonic) passes, sleeping in
    between with a growing pause after the first ``spin`` seconds."""
    start = time.monotonic()
    pause = 2e-5
    while not ready():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if now - start < spin:  # the others are usually about to arrive: yield, do not sleep
            _yield_core()
            continue
        pause = min(pause * 2, MAX_PAUSE if now - start < 1.0 else LONG_PAUSE)
        if deadline is not None:
            pause = min(pause, max(deadline - now, 0.0))
        time.sleep(pause)
    return True


def _free(mpi_comm: Any) -> None:
    from mpi4py import MPI

    if not MPI.Is_finalized():  # at exit, mpi4py may have finalized MPI already
        mpi_comm.Free()


def _duplicate(comm: Any, timeout: float | None) -> Any:
    """``comm.Dup()``, waiting at most ``timeout`` seconds for every rank to take part."""
    if timeout is None:
        return comm.Dup()
    new, request = comm.Idup()
    if not _poll(request.Test, time.monotonic() + timeout):
        raise errors.DeadlineExceededError(
            f"constructing a Saver: not all {comm.Get_size()} ranks of the communicator constructed a "
            f"Saver within {timeout:g} s (this is rank {comm.Get_rank()}); constructing a Saver is "
            "collective, every rank must call it (MPI does not tell which rank did not)"
        )
    return new


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


def _wait_or_break(comm: Comm, requests: list, what: str, doing: str, spin: float = COLLECTIVE_SPIN) -> None:
    """Poll MPI ``requests`` until done or ``comm.timeout``; then the Comm is broken."""
    from mpi4py import MPI

    _poll_or_break(comm, lambda: MPI.Request.Testall(requests), what, doing, spin)


def _poll_or_break(
    comm: Comm, ready: Callable[[], bool], what: str, doing: str, spin: float = COLLECTIVE_SPIN
) -> None:
    """Call ``ready`` until true (``_poll``, sleeping after ``spin`` s) or ``comm.timeout``
    passes; then mark the Comm broken and raise DeadlineExceededError naming ``doing``."""
    deadline = None if comm.timeout is None else time.monotonic() + comm.timeout
    if not _poll(ready, deadline, spin):
        comm._broken = f"{what}: {doing}"
        raise errors.DeadlineExceededError(
            f"{what}: rank {comm.rank} did not complete {doing} among the {comm.size} ranks within "
            f"{comm.timeout:g} s (a rank never arrived or stopped)"
        )
