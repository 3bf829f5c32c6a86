"""Steps 3 and 4 of a save with ``Saver(files_per_node=k)``: the ranks of a node send their
bytes to ``k`` writers of that node (groups.py), so a checkpoint has ``k`` data files per
node instead of one per rank. Step 5 is the save's own (protocol.commit, one report per
file). Per rank:

3. :func:`prepare`: count the bytes this rank stores (strings encoded), while the
   coordinator prepares the directory as for any save (commit.prepare); the ranks agree,
   then all-gather the counts, so every rank knows where its bytes start in its file.
4. :func:`write`: a *member* runs the ordinary writer (writer.py: entry and block CRC32Cs
   computed by the rank that owns the bytes, index entries encoded with its file's shard
   id and its own offsets) into a :class:`_Sender`, which sends each buffer to its writer
   through ``peers.stream`` (straight from the array's buffer, or a batch of small arrays
   of at most 4 MiB), each preceded by a header with its size and CRC32C. A *writer*
   writes its own blocks first, then receives each member's bytes in file order, 16 MiB
   at a time into two reused buffers, checks every buffer's CRC32C and writes it to its
   file (staged, fsynced, as any data file). Then all agree, as after any write.

Messages (tag :data:`TAG`, the Saver's own communicator): the writer tells a member its
turn has come (16 bytes); then, member to writer, a header of two uint64 ``(size, masked
CRC32C)`` then ``size`` bytes, repeated; ``(END, 0)`` when
done, ``(ABORT, 0)`` if the member failed (its error reaches everyone at the agree). A
writer that failed (its file cannot be created or written, a CRC differs) keeps its first
error and still receives, and drops, everything its members send: no member waits for a
writer that gave up, and every rank raises the same combined error at the agree.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np

from .. import storage
from .._comm import Comm, peers
from .._comm.nodes import known_node_ids
from ..errors import DataLossError
from ..format import crc
from ..format.merge import encode_rank_part
from ..plan import SavePlan
from . import commit as commit_protocol
from .groups import FileGroups, file_groups
from .replicas import ReplicaCrcs
from .writer import data_size, write_data_file

TAG = 0x5A513
END = (1 << 64) - 1
ABORT = (1 << 64) - 2
HEADER = 16


def groups(job) -> FileGroups:
    """Collective (at the first save on ``job.comm``): who writes which file."""
    return file_groups(known_node_ids(job.comm, job.what), job.files_per_node)


# --------------------------------------------------------------------------- step 3
def prepare(job, arrays: list) -> tuple[commit_protocol.SaveMode, list[int]]:
    """Step 3. Every rank: the bytes it stores; the coordinator: the directory and this
    save's id (commit.prepare). All agree; every rank gets the mode and every rank's count."""
    comm = job.comm
    err, mode, size = None, None, None
    try:
        size = data_size(arrays)
        if comm.is_coordinator:
            mode = commit_protocol.prepare(job.loc, fsync=job.fsync)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
        err = exc
    comm.agree(err, job.what)
    return comm.bcast(mode), comm.allgather(size)


# --------------------------------------------------------------------------- step 4
def write(
    job,
    mode: commit_protocol.SaveMode,
    files: FileGroups,
    sizes: list[int],
    the_plan: SavePlan,
    todo: tuple[list, list],
    replicas: list,
) -> tuple:
    """Step 4. Every rank: send its bytes to its writer, or (a writer) write its file. All
    agree; a writer removes its file if any rank failed. The report for the coordinator:
    the index part, and for a writer its file's bytes and (S3) ETag, else None."""
    comm, rank = job.comm, job.comm.rank
    shard = files.shard_of[rank]
    members = files.members[shard]
    masks: list[int] = []
    copies = ReplicaCrcs(replicas)
    entries: tuple = ([], b"", ())
    replica_crcs: list = []
    out = data_loc = None
    if members[0] == rank:
        data_loc = job.loc.with_path(mode.data_path(job.loc.path, shard, files.files))
        err, out, entries = _write_file(job, data_loc, shard, members, sizes, todo, masks)
    else:
        err, entries = _send(job, members[0], shard, files.base(rank, sizes), sizes[rank], todo, masks)
    if err is None:
        try:
            replica_crcs = copies.result(masks)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
            err = exc
    try:
        comm.agree(err, job.what)
    except Exception:
        if data_loc is not None:
            storage.remove([data_loc])
        raise
    written = None if out is None else out.written
    return (
        encode_rank_part(*entries, the_plan.sliced),
        written,
        replica_crcs,
        None if out is None else out.etag,
    )


def _write_file(job, loc, shard: int, members, sizes, todo, masks) -> tuple:
    """A writer: its own blocks, then every member's bytes. ``(error, writer, entries)``."""
    entries: tuple = ([], b"", ())
    out = None
    receiver = _Receiver(job.comm, None, loc, job.what)
    try:
        out = storage.Writer(loc, fsync=job.fsync, size_hint=sum(sizes[m] for m in members))
        entries = write_data_file(out, *todo, shard, masks)
        receiver.out = out
    except Exception as exc:  # noqa: BLE001 - the members are still drained
        receiver.fail(exc)
    try:
        try:
            for member in members[1:]:
                receiver.member(member, sizes[member])
        finally:
            receiver.finish()
        complete = receiver.error is None and not receiver.aborted
        if complete and out.written != sum(sizes[m] for m in members):
            raise DataLossError(f"{loc.url}: wrote {out.written} bytes, not {sum(sizes[m] for m in members)}")
        if complete:
            out.close()
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
        receiver.fail(exc)
    if (receiver.error is not None or receiver.aborted) and out is not None:
        out.abort()  # a member that gave up reports its own error at the agree
    return receiver.error, out, entries


def _send(job, writer: int, shard: int, base: int, size: int, todo, masks) -> tuple:
    """A member: its blocks to ``writer``, entries at ``base`` in file ``shard``."""
    sender = _Sender(job.comm, writer, job.what)
    try:
        sender.wait_for_turn()
        entries = write_data_file(sender, *todo, shard, masks, base=base)
        if sender.sent != size:
            raise DataLossError(f"{job.what}: rank {job.comm.rank} sent {sender.sent} bytes, not {size}")
        sender.header(END, 0)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
        if not sender.broken:
            with contextlib.suppress(Exception):
                sender.header(ABORT, 0)
        return exc, ([], b"", ())
    return None, entries


class _Sender:
    """What writer.py writes into on a member: each buffer goes to the writer, after a
    header with its size and masked CRC32C (computed here, from the owner's buffer)."""

    def __init__(self, comm: Comm, writer: int, what: str):
        self.comm, self.writer, self.what = comm, writer, what
        self.sent = 0
        self.broken = False  # a send failed: the writer's view of the messages is unknown

    def wait_for_turn(self) -> None:
        """Until the writer is ready for this rank's bytes: a rank sending while its writer
        still writes others' would wait in MPI with ever longer sleeps between polls, and
        an MPI transfer between processes moves only while both poll."""
        self._guarded(peers.receive, memoryview(bytearray(HEADER)))

    def header(self, size: int, masked: int) -> None:
        self._guarded(peers.send_all, [np.array([size, masked], np.uint64)])

    def write(self, buffer) -> None:
        view = memoryview(buffer).cast("B")
        if len(view):  # the header and the bytes posted together: one wait, not two
            self._guarded(peers.send_all, [np.array([len(view), crc.masked_crc32c(view)], np.uint64), view])
            self.sent += len(view)

    def _guarded(self, call, what) -> None:
        try:
            call(self.comm, self.writer, what, self.what, tag=TAG)
        except BaseException:
            self.broken = True
            raise


SPARE_PIECES = 3
"""Receive buffers of a writer (STREAM_PIECE each): one arriving, one being checked and
written by the writer's thread, one spare, so that neither waits for the other."""


class _Receiver:
    """A writer's side: members' bytes into ``out`` as they arrive. The main thread
    receives (an MPI transfer moves only while the receiver polls); a second thread checks
    each piece's CRC32C and writes it (both release the GIL), so a piece is written while
    the next arrives. Only a failed receive (a member gone: DeadlineExceededError) raises;
    any other failure is kept in ``error`` (the first) and the rest is received and dropped.
    :meth:`finish` (always: it stops the thread) before reading ``error``."""

    def __init__(self, comm: Comm, out: storage.Writer | None, loc: storage.Location, what: str):
        self.comm, self.out, self.loc, self.what = comm, out, loc, what
        self.error: BaseException | None = None
        self.aborted: list[int] = []  # members that gave up (each raises its own error)
        self._lock = threading.Lock()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._queued = 0  # member bytes handed to the thread so far

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.error = self.error or exc

    def member(self, rank: int, expected: int) -> None:
        """Every segment ``rank`` sends, up to its END (or ABORT: its own error is what
        every rank raises)."""
        if self._thread is None:
            for _ in range(SPARE_PIECES):
                self._free.put(np.empty(peers.STREAM_PIECE, np.uint8))
            self._base = 0 if self.out is None else self.out.written
            self._thread = threading.Thread(
                target=self._check_and_write, name="shardsave-gather", daemon=True
            )
            self._thread.start()
        header = np.zeros(2, np.uint64)
        peers.send_all(self.comm, rank, [header], self.what, tag=TAG)  # its turn
        got = 0
        while True:
            peers.receive(self.comm, rank, memoryview(header).cast("B"), self.what, tag=TAG)
            size, want = int(header[0]), int(header[1])
            if size == ABORT:
                self.aborted.append(rank)
                return
            if size == END:
                break
            at = self._base + self._queued
            for lo in range(0, size, peers.STREAM_PIECE):
                n = min(peers.STREAM_PIECE, size - lo)
                buf = self._free.get()
                try:
                    peers.receive(self.comm, rank, memoryview(buf)[:n], self.what, tag=TAG)
                except BaseException:
                    self._free.put(buf)
                    raise
                last = lo + n >= size
                self._todo.put((buf, n, (rank, size, want, at) if last else None))
                self._queued += n
            got += size
        if got != expected:
            self.fail(DataLossError(f"{self.loc.url}: rank {rank} sent {got} bytes, not {expected}"))

    def finish(self) -> None:
        """Wait until every received piece is checked and written; stop the thread."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def _check_and_write(self) -> None:
        running = 0
        while (item := self._todo.get()) is not None:
            buf, n, end = item
            view = memoryview(buf)[:n]
            running = crc.crc32c(view, running)
            if self.error is None and self.out is not None:
                try:
                    self.out.write(view)
                except Exception as exc:  # noqa: BLE001 - reported at the agree
                    self.fail(exc)
            self._free.put(buf)
            if end is not None:
                rank, size, want, at = end
                if crc.mask(running) != want:
                    self.fail(
                        DataLossError(
                            f"{self.loc.url}: the {size} bytes rank {rank} sent for offset {at} arrived with "
                            f"masked CRC32C {crc.mask(running):#010x}, but it sent {want:#010x}; nothing was "
                            "committed"
                        )
                    )
                running = 0
