"""Serving byte ranges of a rank's files to the other ranks over MPI (the fast tier's
restart: a rank reads the parts of another node's files that its blocks need, and only
those).

Every rank runs a :class:`FileServer` thread on a communicator of its own. A client
sends ``(name, [(offset, length), ...], reply_tag)`` to the rank that holds the file;
the server answers on ``reply_tag`` with a header (None, or the error that stopped it)
and then the bytes of each range, raw. A client's reply tags are its own, so several
threads of one rank may fetch at once. Every wait is bounded by the Comm's timeout.
Stopping is collective (:meth:`FileServer.stop`): only when every rank has finished its
fetches does any server stop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

from .. import errors
from . import Comm, _poll
from .peers import pieces

REQUEST_TAG = 0x5A520
REPLY_TAGS = (0x5A600, 0x7A600)
"""Reply tags cycle in this range (a client's own: the server answers on the one asked)."""
MAX_RANGES = 1 << 16
MAX_REQUEST = 1 << 40


class FileServer:
    """``serve(name) -> (read(ranges), size)`` says how this rank reads one of the files
    it serves, or raises; ``read(ranges)`` fills ``[(offset, buffer)]``. Construction
    starts the thread (not collective); :meth:`stop` is collective over ``comm``."""

    def __init__(self, comm: Comm, serve: Callable[[str], tuple[Callable, int]], what: str):
        self.comm = comm
        self.what = what
        self._serve = serve
        self._tags = itertools.cycle(range(*REPLY_TAGS))
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.bytes_served = 0
        self.bytes_fetched = 0
        self.error: BaseException | None = None
        self._thread = None
        if comm._comm is not None:
            self._thread = threading.Thread(target=self._loop, name="shardsave-serve", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ client
    def fetch(self, rank: int, name: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, buffer)`` with the bytes of ``name`` as rank ``rank``
        serves it (this rank: read here, without MPI)."""
        if rank == self.comm.rank:
            read, size = self._serve(name)
            _check_spans(name, [(off, len(buf)) for off, buf in ranges], size)
            read(ranges)
            with self._lock:
                self.bytes_fetched += sum(len(buf) for _, buf in ranges)
            return
        from mpi4py import MPI

        mpi = self.comm._usable(self.what)
        with self._lock:
            tag = next(self._tags)
        spans = [(int(off), len(buf)) for off, buf in ranges]
        deadline = None if self.comm.timeout is None else time.monotonic() + self.comm.timeout
        send = mpi.isend((name, spans, tag), dest=rank, tag=REQUEST_TAG)
        status = MPI.Status()
        header: list = []

        def probed() -> bool:
            msg = mpi.improbe(source=rank, tag=tag, status=status)
            if msg is not None:
                header.append(msg.recv())
            return bool(header)

        if not _poll(probed, deadline):
            send.Cancel()
            raise self._late(rank, name)
        send.Wait()
        if header[0] is not None:
            raise errors.UnavailableError(f"{self.what}: rank {rank} could not serve {name}: {header[0]}")
        requests = [
            mpi.Irecv([piece, MPI.BYTE], source=rank, tag=tag)
            for _, buf in ranges
            for piece in pieces(memoryview(buf).cast("B"))
        ]
        if not _poll(lambda: MPI.Request.Testall(requests), deadline):
            for req in requests:
                req.Cancel()
            raise self._late(rank, name)
        with self._lock:
            self.bytes_fetched += sum(n for _, n in spans)

    def _late(self, rank: int, name: str) -> errors.DeadlineExceededError:
        return errors.DeadlineExceededError(
            f"{self.what}: rank {rank} did not serve {name} to rank {self.comm.rank} "
            f"within {self.comm.timeout:g} s"
        )

    # ------------------------------------------------------------------ server
    def _loop(self) -> None:
        from mpi4py import MPI

        mpi = self.comm._comm
        status = MPI.Status()
        pause = 1e-4
        while not self._stopping.is_set():
            msg = mpi.improbe(source=MPI.ANY_SOURCE, tag=REQUEST_TAG, status=status)
            if msg is None:
                time.sleep(pause)
                pause = min(pause * 2, 2e-3)
                continue
            pause = 1e-4
            source = status.Get_source()
            try:
                self._answer(mpi, source, msg.recv())
            except Exception as exc:  # noqa: BLE001 - a client that went away; keep serving the others
                self.error = exc

    def _answer(self, mpi, source: int, request) -> None:
        from mpi4py import MPI

        buffers: list[bytearray] = []
        header = None
        try:
            name, spans, tag = request
            if not (isinstance(name, str) and isinstance(spans, list) and isinstance(tag, int)):
                raise errors.InvalidArgumentError("a request must be (name, spans, tag)")
            read, size = self._serve(name)
            _check_spans(name, spans, size)
            buffers = [bytearray(n) for _, n in spans]
            read([(off, memoryview(b)) for (off, _), b in zip(spans, buffers, strict=True)])
        except Exception as exc:  # noqa: BLE001 - the client raises it
            header, buffers = f"{type(exc).__name__}: {exc}", []
        if header is not None and not isinstance(request, tuple):
            return
        tag = request[2]
        requests = [mpi.isend(header, dest=source, tag=tag)]
        for b in buffers:
            requests += [mpi.Isend([p, MPI.BYTE], dest=source, tag=tag) for p in pieces(memoryview(b))]
        deadline = None if self.comm.timeout is None else time.monotonic() + self.comm.timeout
        if not _poll(lambda: MPI.Request.Testall(requests), deadline):
            for req in requests:
                req.Cancel()
            raise self._late(source, request[0])
        with self._lock:
            self.bytes_served += sum(len(b) for b in buffers)

    def stop(self) -> None:
        """Collective: once every rank is done fetching, every server stops."""
        try:
            self.comm.every_rank(f"{self.what}: finishing", lambda: None)
        finally:
            self._stopping.set()
            if self._thread is not None:
                self._thread.join()


def _check_spans(name: str, spans: list, size: int) -> None:
    """A request is input too: every range inside the file, a bounded number of them."""
    if len(spans) > MAX_RANGES:
        raise errors.InvalidArgumentError(f"{name}: {len(spans)} ranges in one request")
    total = 0
    for span in spans:
        off, n = span
        if not (isinstance(off, int) and isinstance(n, int) and off >= 0 and n >= 0 and off + n <= size):
            raise errors.DataLossError(f"{name} has {size} bytes; range {span!r} is outside it")
        total += n
    if total > MAX_REQUEST:
        raise errors.InvalidArgumentError(f"{name}: a request for {total} bytes")
