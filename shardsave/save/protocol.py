"""The collective save, one function per step. Every step ends with the ranks agreeing
(``Comm.agree``, or a gather the coordinator answers), so a failure anywhere makes every
rank raise the same error and none waits longer than the Saver's ``timeout``:

1. :func:`check_arrays`: every rank lists and checks its blocks; the ranks agree that all
   passed and that they all passed the same prefix and options (the key);
2. :func:`plan`: the coordinator plans (plan.py) from everybody's block lists (a
   gather; or the last save's plan, if one all-reduce finds no rank's blocks changed):
   who writes which block, replicated blocks once, and the checks of shapes, overlaps
   and gaps; the ranks agree, and each gets its share of the plan;
3. :func:`prepare`: the coordinator creates the directory, finishes or undoes what an
   interrupted save of this prefix left and picks this save's id (commit.py);
4. :func:`write`: every rank streams its blocks into its data file (writer.py),
   ``P.data-<rank>-of-<size>`` staged under a name of this save's own while an older
   checkpoint stays at ``P``. With ``Saver(files_per_node=k)`` steps 3 and 4 are
   gather.py's: the ranks of a node send their bytes to k writers, one file each;
5. :func:`commit`: the coordinator gathers the index entries and the CRC32C of every
   replicated block from each of its holders (which must agree, replicas.py), checks every
   data file is the one its rank wrote, commits (commit.py: a journal, then renames; the
   old checkpoint or the new one is restorable at every moment), writes the state file and
   deletes what retention lets go (retention.py); every rank then remembers the same list.

A non-blocking save (:func:`start_in_background`) runs step 1 and a copy into staging
buffers in the caller's thread, and steps 2 to 5 in a background thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import numpy as np

from .. import retention, storage
from .._comm import Comm
from ..errors import FailedPreconditionError, InvalidArgumentError
from ..format import dtypes
from ..format.index import entry_key
from ..format.merge import encode_rank_part, merge_index
from ..plan import Block, BlockMeta, SavePlan, rows_of
from . import commit as commit_protocol
from . import gather
from .layout import SaveLayout
from .pending import SaveHandle
from .planning import coordinated_plan
from .replicas import ReplicaCrcs, checked_replicas
from .staging import StagingBuffers
from .writer import write_data_file

log = logging.getLogger("shardsave")


@dataclass(frozen=True)
class SaveJob:
    """One save as every rank runs it: where it goes and the Saver's options for it."""

    comm: Comm
    layout: SaveLayout
    prefix: str
    loc: storage.Location
    latest_filename: str | None
    write_state: bool
    fsync: bool
    check_replicas: bool
    save_relative_paths: bool
    max_to_keep: int | None
    keep_checkpoint_every_n_hours: float
    storage_options: dict | None
    fs: Any
    retain: Callable[[float], retention.Retained]
    """TF's retention after this save at a timestamp, on the Saver's bookkeeping."""
    files_per_node: int | None = None
    """None: every rank writes its own data file; k: k writers per node (gather.py)."""
    started: float = field(default_factory=monotonic)
    """When ``save`` was called, for the log line of its commit."""

    @classmethod
    def of(
        cls,
        saver: Any,
        layout: SaveLayout,
        prefix: str,
        loc: storage.Location,
        latest_filename: str | None,
        write_state: bool,
        retain: Callable[[float], retention.Retained],
    ) -> SaveJob:
        """The job of ``saver.save``, with the Saver's options as they are now."""
        return cls(
            comm=saver.comm,
            layout=layout,
            prefix=prefix,
            loc=loc,
            latest_filename=latest_filename,
            write_state=write_state,
            fsync=saver.fsync,
            check_replicas=saver.check_replicas,
            save_relative_paths=saver.save_relative_paths,
            max_to_keep=saver.max_to_keep,
            keep_checkpoint_every_n_hours=saver.keep_checkpoint_every_n_hours,
            storage_options=saver.storage_options,
            fs=saver.fs,
            retain=retain,
            files_per_node=getattr(saver, "files_per_node", None),
        )

    @property
    def what(self) -> str:
        return f"saving {self.prefix}"

    def key(self, blocking: bool) -> dict:
        """What every rank must pass alike to ``save``: the prefix (as given, and where it
        leads: a relative one on ranks with different working directories) and every option
        that changes what is written (compared in step 1, before anything is)."""
        return {
            "prefix": self.prefix,
            "location": self.loc.url,
            "latest_filename": self.latest_filename,
            "write_state": bool(self.write_state),
            "blocking": bool(blocking),
            "fsync": self.fsync,
            "max_to_keep": self.max_to_keep,
            "keep_checkpoint_every_n_hours": self.keep_checkpoint_every_n_hours,
            "save_relative_paths": self.save_relative_paths,
            "check_replicas": self.check_replicas,
            "files_per_node": self.files_per_node,
        }


# --------------------------------------------------------------------------- step 1
def locate(
    comm: Comm,
    save_path: str | os.PathLike,
    prefix_of: Callable[[], str],
    resolve: Callable[[str], storage.Location],
) -> tuple[str, storage.Location]:
    """Before step 1, every rank: the prefix and where it leads. Explicit rather than
    ``comm.every_rank``: only a rank that fails agrees here, with its error, in the round
    the others reach in :func:`check_arrays`, rather than leave them waiting."""
    try:
        prefix = prefix_of()
        loc = resolve(prefix)
        if loc.is_s3 and "/" not in loc.path.strip("/"):
            raise InvalidArgumentError(
                f"cannot save to {prefix!r}: the prefix needs a name inside the bucket"
            )
    except Exception as exc:
        comm.agree(exc, f"saving {os.fspath(save_path)}")
        raise
    return prefix, loc


def check_arrays(
    comm: Comm, layout: SaveLayout, prefix: str, key: dict | None = None
) -> tuple[list[np.ndarray], list[BlockMeta]]:
    """Step 1. Every rank: list and check its blocks. All: raise if any rank failed or the
    ranks' ``key`` (prefix and options) differ; nothing is written before this."""
    return comm.every_rank(f"saving {prefix}", lambda: local_arrays(layout, prefix), key=key)


def local_arrays(layout: SaveLayout, prefix: str) -> tuple[list[np.ndarray], list[BlockMeta]]:
    """This rank's arrays (in the order of ``layout``), checked, and what it tells the
    other ranks about them."""
    arrays = layout.arrays()
    metas = layout.cached_metas(arrays)
    if metas is not None:  # same shapes and dtypes as last time: already checked
        for i in layout.string_items:  # but a string tensor's contents change without its shape
            _check_strings(prefix, layout.names[i], arrays[i])
        return arrays, metas
    metas = _plain_metas(layout, arrays)
    if metas is not None:
        layout.remember(arrays, metas, [])
        return arrays, metas
    metas = []
    add_meta, to_tf = metas.append, dtypes.to_tf
    strings = []
    for name, var, arr in zip(layout.names, layout.variables, arrays, strict=True):
        if arr is None:
            raise FailedPreconditionError(
                f"saving {prefix}: variable {name!r} is not initialized; "
                "initialize, assign or restore it before saving"
            )
        try:
            tf_type = to_tf(arr.dtype)
        except ValueError as exc:
            raise InvalidArgumentError(f"saving {prefix}: variable {name!r}: {exc}") from None
        if tf_type == dtypes.DT_STRING:
            _check_strings(prefix, name, arr)
            nbytes = _nbytes(arr)
            strings.append(len(metas))
        else:
            nbytes = arr.nbytes
        add_meta(BlockMeta(name, tf_type, var.global_shape, Block(var.offset, var.shape), nbytes))
    # a string tensor's byte count goes stale when its contents change (the manager's
    # metadata, every save): it only weighs the plan's balance of replicated writes, and
    # the plan stays valid; the writer sizes every tensor from its array
    layout.remember(arrays, metas, strings)
    return arrays, metas


def _plain_metas(layout: SaveLayout, arrays: list[np.ndarray | None]) -> list[BlockMeta] | None:
    """``local_arrays``' metadata column-wise, when every variable holds an array of a
    dtype the format stores as bytes (the common case); None sends the others through the
    loop that checks and explains each."""
    try:
        numpy_types = [a.dtype for a in arrays]
        tf_of = {id(t): dtypes.to_tf(t) for t in {id(t): t for t in numpy_types}.values()}
    except (AttributeError, ValueError):  # uninitialized, or a dtype the format cannot hold
        return None
    types = list(map(tf_of.__getitem__, map(id, numpy_types)))
    if dtypes.DT_STRING in types:
        return None
    variables = layout.variables
    blocks = rows_of(Block, [v.offset for v in variables], [v.shape for v in variables])
    global_shapes = [v.global_shape for v in variables]
    return rows_of(BlockMeta, layout.names, types, global_shapes, blocks, [a.nbytes for a in arrays])


def _check_strings(prefix: str, name: str, arr: np.ndarray) -> None:
    """Object arrays are string tensors: every element must be bytes or str."""
    for i, item in enumerate(arr.reshape(-1)):
        if not isinstance(item, bytes | str | np.bytes_):
            raise InvalidArgumentError(
                f"saving {prefix}: variable {name!r} has dtype object, which is stored as a string "
                f"tensor, but element {i} is {type(item).__name__} {item!r}, not bytes or str"
            )


def _nbytes(arr: np.ndarray) -> int:
    if arr.dtype.hasobject:
        return sum(len(x) if isinstance(x, bytes | str) else 0 for x in arr.reshape(-1)) + arr.size
    return arr.nbytes


# --------------------------------------------------------------------------- step 2
def plan(job: SaveJob, arrays: list[np.ndarray], metas: list[BlockMeta]):
    """Step 2. Every rank: the plan, and what this rank writes (index keys, arrays) and
    the replicas whose CRCs it reports. The plan of the last save still holds if no rank's
    blocks changed since: one small all-reduce instead of an all-gather of every rank's
    block lists and planning again (which the coordinator does: planning.py)."""
    comm, layout = job.comm, job.layout
    cached = layout.plan if metas is layout.metas else None
    if comm.all_true(cached is not None):
        the_plan, keys, indices, empties = cached
    else:
        the_plan = coordinated_plan(job, metas)
        writes = the_plan.writes[comm.rank]
        keys = [a.name.encode() if a.extents is None else entry_key(a.name, a.extents) for a in writes]
        indices = [a.index for a in writes]
        # a plain entry always has the global shape: a zero-size tensor split over
        # ranks is stored whole, as one empty entry
        variables = layout.variables
        empties = [
            (pos, variables[a.index].global_shape)
            for pos, a in enumerate(writes)
            if a.extents is None and arrays[a.index].shape != variables[a.index].global_shape
        ]
        if metas is layout.metas:
            layout.plan = (the_plan, keys, indices, empties)
    log.debug("%s: step 2, plan %s", job.prefix, "reused" if cached is not None else "made")
    todo = [arrays[i] for i in indices]
    for pos, shape in empties:
        todo[pos] = np.empty(shape, dtype=todo[pos].dtype)
    replicas = (
        [(n, arrays[i], pos) for n, i, pos in the_plan.replica_items[comm.rank]] if job.check_replicas else []
    )
    return the_plan, (keys, todo), replicas


# --------------------------------------------------------------------------- step 3
def prepare(job: SaveJob) -> commit_protocol.SaveMode:
    """Step 3. The coordinator: the directory exists, an interrupted save of this prefix
    is finished or undone, and this save's id and way of writing (staged or direct) are
    chosen. Every rank gets that choice, or the coordinator's error."""
    mode = job.comm.coordinator_only(job.what, lambda: commit_protocol.prepare(job.loc, fsync=job.fsync))
    log.debug("%s: step 3, directory prepared", job.prefix)
    return mode


# --------------------------------------------------------------------------- step 4
def write(
    job: SaveJob, mode: commit_protocol.SaveMode, the_plan: SavePlan, todo: tuple[list, list], replicas: list
) -> tuple:
    """Step 4. Every rank: write its data file (and, in a second thread, the CRCs of the
    replicas it holds but does not write). All agree; a rank whose file was written
    deletes it if another rank failed. Returns what this rank reports to the coordinator:
    its index part, bytes written, replica CRCs and (S3) the file's ETag."""
    comm = job.comm
    data_loc = job.loc.with_path(mode.data_path(job.loc.path, comm.rank, comm.size))
    entries: tuple = ([], b"", ())
    # Explicit rather than comm.every_rank: a failed write is aborted before the ranks
    # agree, and a written file is removed when another rank failed.
    err = None
    out = None
    masks: list[int] = []
    copies = ReplicaCrcs(replicas)  # of the copies another rank writes, while this one writes
    replica_crcs: list[tuple[int, int]] = []
    try:
        # the part size of an S3 upload follows from it (strings counted roughly: a hint)
        hint = sum(array.nbytes for array in todo[1])
        out = storage.Writer(data_loc, fsync=job.fsync, size_hint=hint)
        entries = write_data_file(out, *todo, comm.rank, masks)
        out.close()
        replica_crcs = copies.result(masks)
    except Exception as exc:  # noqa: BLE001
        err = exc
        if out is not None:
            out.abort()
    try:
        comm.agree(err, job.what)
    except Exception:
        storage.remove([data_loc])
        raise
    log.debug("%s: step 4, rank %d wrote %d bytes", job.prefix, comm.rank, out.written if out else 0)
    return (
        encode_rank_part(*entries, the_plan.sliced),
        out.written if out else 0,
        replica_crcs,
        out.etag if out else None,
    )


# --------------------------------------------------------------------------- step 5
def commit(
    job: SaveJob,
    mode: commit_protocol.SaveMode,
    the_plan: SavePlan,
    report: tuple,
    writers: tuple[int, ...] | None = None,
) -> float:
    """Step 5. Every rank: send its report to the coordinator. The coordinator: check that
    the holders of every replica hold the same bytes, merge the index, commit (every data
    file is the one its rank wrote; commit.py), then write the state file and delete the
    checkpoints retention lets go. Every rank gets the coordinator's timestamp of this
    save (from which it computes the same retention), or its error. ``writers``: the rank
    that wrote each data file (``files_per_node``), else every rank wrote its own."""
    comm = job.comm
    gathered = comm.gather(report)

    def on_coordinator() -> float:
        timestamp = time.time()
        checked = checked_replicas(job.prefix, the_plan, [g[:3] for g in gathered])
        files = [(checked[r][1], gathered[r][3]) for r in (writers or range(len(gathered)))]
        index = merge_index(
            len(files),
            [part for part, _ in checked],
            {name: (dt, shape) for name, (dt, shape, _) in the_plan.sliced.items()},
        )
        finish(job, mode, files, index, timestamp)
        return timestamp

    return comm.coordinator_only(job.what, on_coordinator)


def finish(
    job: SaveJob, mode: commit_protocol.SaveMode, reports: list, index: bytes, timestamp: float
) -> None:
    """The coordinator, once every data file is written: commit ``index`` (``reports``:
    each saving rank's bytes and ETag), write the state file, delete what retention lets
    go. Also the fast tier's drain (tiers/drain.py), whose index is made already."""
    commit_protocol.commit(job.loc, mode, reports, index, job.what, fsync=job.fsync)
    kept, doomed, _, preserved = job.retain(timestamp)
    if job.write_state:
        retention.write_state(
            kept or [(job.prefix, timestamp)],
            job.latest_filename,
            preserved,
            save_relative_paths=job.save_relative_paths,
            storage_options=job.storage_options,
            fs=job.fs,
            fsync=job.fsync,
        )
    log.info(
        "saved %s: %d bytes in %.2f s on %d ranks",
        job.prefix,
        sum(written for written, _ in reports),
        monotonic() - job.started,
        job.comm.size,
    )
    for path in doomed:
        retention.delete_expired(job.loc, storage.resolve(path, job.storage_options, job.fs))
        log.info("retention deleted %s", path)


def plan_write_commit(job: SaveJob, arrays: list[np.ndarray], metas: list[BlockMeta]) -> float:
    """Steps 2 to 5, after :func:`check_arrays`; the coordinator's timestamp of the save."""
    the_plan, todo, replicas = plan(job, arrays, metas)
    if job.files_per_node is not None:  # k writers per node: steps 3 and 4 of gather.py
        files = gather.groups(job)
        mode, sizes = gather.prepare(job, todo[1])
        report = gather.write(job, mode, files, sizes, the_plan, todo, replicas)
        return commit(job, mode, the_plan, report, files.writers)
    mode = prepare(job)
    report = write(job, mode, the_plan, todo, replicas)
    return commit(job, mode, the_plan, report)


# ---------------------------------------------------------------------- non-blocking
def start_in_background(
    job: SaveJob,
    arrays: list[np.ndarray],
    metas: list[BlockMeta],
    staging: StagingBuffers,
    run: Callable[[SaveJob, list[np.ndarray], list[BlockMeta]], str],
    register: Callable[[SaveHandle], None],
) -> SaveHandle:
    """After step 1: copy this rank's arrays into ``staging`` (training may change them
    right away) and start ``run`` (steps 2 to 5) on the copies in a thread of its own,
    on the Saver's own communicator. ``register`` gets the handle before the thread starts."""
    comm, layout = job.comm, job.layout
    if comm.size > 1 and not comm.thread_multiple:
        raise FailedPreconditionError(
            "a non-blocking save needs MPI initialized with MPI_THREAD_MULTIPLE "
            "(mpi4py's default); this MPI provides less"
        )
    token = metas if metas is layout.metas else None  # stands for these shapes and dtypes
    copies = staging.restage(token, arrays)
    if copies is None:
        keys = [(name, var.offset) for name, var in zip(layout.names, layout.variables, strict=True)]
        copies = staging.stage(keys, arrays, token)
    handle = SaveHandle(job.prefix)
    thread = threading.Thread(
        target=handle._run, args=(run, job, copies, metas), name=f"shardsave-save-{job.prefix}"
    )
    register(handle)
    thread.start()
    return handle
