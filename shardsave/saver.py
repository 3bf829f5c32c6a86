"""The Saver: collective save and restore of a set of variables, as ``tf.train.Saver``.

Per rank, ``save`` runs (every step ends in :meth:`Comm.agree`, so a failure anywhere
makes every rank raise the same error and none waits longer than ``timeout``):

1. list this rank's blocks (name, dtype, global shape, block) and check them; every rank
   must have passed the same prefix and options (Comm.agree compares them);
2. all-gather the lists; every rank computes the same plan (plan.py): who writes which
   block, replicated blocks once, and the checks of shapes, overlaps and gaps;
3. the coordinator creates the directory, finishes or undoes what an interrupted save
   of this prefix left, and picks this save's id (commit.py);
4. every rank streams its blocks into its data file (writer.py): ``P.data-<rank>-of-<size>``
   staged under a name of this save's own while an older checkpoint stays at ``P``;
5. the coordinator gathers the index entries (and the CRC32C of every replicated block
   from each of its holders, which must agree), checks every data file is the one its rank
   wrote, and commits (commit.py: a journal, then renames; the old checkpoint or the new
   one is restorable at every moment), then writes the state file and deletes
   checkpoints that retention lets go.

``restore``: the coordinator reads the index once and broadcasts it; every rank plans and
reads only the byte ranges its own blocks need (loader.py). Into fresh arrays, which the
variables take only when every rank succeeded; or, for large arrays the variables hold
already, in place, once every rank has checked every byte (in_place.py).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import operator
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import checkpoint_state, commit, gcpause, storage
from ._comm import Comm
from .errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from .format import dtypes, names
from .format.bundle import Index, encode_rank_part, entry_key, merge_index, parse_index
from .format.coding import DecodeError
from .format.state import MAX_STATE_ENTRIES
from .layout import SaveLayout
from .pending import SaveHandle, register_exit_join
from .plan import Block, BlockMeta, make_save_plan
from .restore.checks import check_shape, stored_dtype
from .restore.fresh import load
from .restore.in_place import InPlaceLoad
from .restore.reads import LoadStats, Target
from .restore.small import is_small_plain, load_small, small_plain_rows
from .staging import StagingBuffers
from .variables import PartitionedVariable, Variable, global_variables
from .writer import entry_crcs, write_data_file

VarList = Mapping[str, Any] | Iterable[Any] | None


def _blocks_of(var: Any) -> list[Variable]:
    if isinstance(var, Variable):
        return [var]
    if isinstance(var, PartitionedVariable):
        return list(var.parts)
    if isinstance(var, list | tuple) and all(isinstance(v, Variable) for v in var):
        return list(var)
    raise InvalidArgumentError(f"cannot save {var!r}: expected a Variable, a PartitionedVariable or a list of parts")


def _saveables(var_list: VarList) -> dict[str, list[Variable]]:
    """``{name in checkpoint: this rank's blocks}`` from TF's forms of ``var_list``."""
    if var_list is None:
        var_list = global_variables()
    if isinstance(var_list, Mapping):
        if "" in var_list:  # the empty key is the index's header entry
            raise InvalidArgumentError("var_list has a variable under the name '': a variable name must not be empty")
        return {str(name): _blocks_of(v) for name, v in var_list.items()}
    out: dict[str, list[Variable]] = {}
    for var in var_list:
        name = getattr(var, "name", None)
        if name is None:
            raise InvalidArgumentError(f"cannot save {var!r}: it has no name")
        if name in out:
            raise InvalidArgumentError(f"at least two variables have the same name: {name!r}")
        out[name] = _blocks_of(var)
    return out


class Saver:
    """Saves and restores variables; every method is collective over ``comm``.

    ``comm`` defaults to ``MPI.COMM_WORLD``; the Saver duplicates it once, here, so
    constructing a Saver is collective too. ``storage_options`` (or a ready fsspec
    ``fs``) apply to every path given to ``save`` and ``restore``.

    ``restore_in_place`` (default True): from a local or shared filesystem, a restore
    writes into the arrays the variables already hold (of at least 1 MiB, same dtype and
    shape, C-contiguous, writable), as PyTorch DCP does, instead of making new ones; it
    checks every byte first, so a damaged checkpoint still changes nothing. False: every
    array is new and the variables adopt them at the end (twice the memory).

    ``timeout`` (seconds; None waits forever): every collective step of save, restore and
    the constructor waits at most this long for the other ranks, then raises
    DeadlineExceededError naming the ranks that did not arrive (e.g. a rank that never
    called ``save``); the Saver is unusable afterwards. ``check_replicas`` (default True):
    a variable held whole by several ranks must have the same bytes on each (their
    CRC32C are compared before the commit); False stores one rank's copy unchecked.
    """

    def __init__(
        self,
        var_list: VarList = None,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        pad_step_number: bool = False,
        save_relative_paths: bool = False,
        allow_empty: bool = False,
        reshape: bool = False,
        *,
        comm: Any = None,
        storage_options: dict | None = None,
        fs: Any = None,
        fsync: bool = True,
        filename: str | None = None,
        restore_in_place: bool = True,
        timeout: float | None = 1800.0,
        check_replicas: bool = True,
    ):
        self._var_list = var_list
        self._saveables = _saveables(var_list)
        if not self._saveables and not allow_empty:
            raise InvalidArgumentError("no variables to save (pass allow_empty=True to save none)")
        if max_to_keep is not None and max_to_keep > MAX_STATE_ENTRIES:
            raise InvalidArgumentError(
                f"max_to_keep={max_to_keep}: a state file lists at most {MAX_STATE_ENTRIES} checkpoints"
            )
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.pad_step_number = pad_step_number
        self.save_relative_paths = save_relative_paths
        self.allow_empty = allow_empty
        self.reshape = reshape
        self.storage_options = storage_options
        self.fs = fs
        self.fsync = fsync
        self.filename = filename
        self.restore_in_place = restore_in_place
        self.check_replicas = check_replicas
        if timeout is not None and (isinstance(timeout, bool) or not (isinstance(timeout, int | float) and timeout > 0)):
            raise InvalidArgumentError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        self._comm = Comm.create(comm, timeout=timeout)
        self._last_checkpoints: list[tuple[str, float]] = []
        self._next_checkpoint_time = time.time() + keep_checkpoint_every_n_hours * 3600
        self._last_preserved_timestamp: float | None = None
        self.last_restore_stats: LoadStats | None = None
        self._pending: SaveHandle | None = None
        self._staging = StagingBuffers()
        self._layout = SaveLayout(self._saveables)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def comm(self) -> Comm:
        return self._comm

    def close(self) -> None:
        """Wait for a pending non-blocking save, then free the Saver's duplicate of the
        communicator (done too when the Saver is collected). Later calls raise
        FailedPreconditionError."""
        try:
            self.wait_until_finished()
        finally:
            self._comm.close()

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def last_checkpoints(self) -> list[str]:
        """Checkpoints not yet deleted by retention, oldest first."""
        return [p for p, _ in self._last_checkpoints]

    def set_last_checkpoints_with_time(self, last_checkpoints_with_time: list[tuple[str, float]]) -> None:
        self._last_checkpoints = list(last_checkpoints_with_time)

    def recover_last_checkpoints(self, checkpoint_paths: list[str]) -> None:
        """Adopt the committed ones of ``checkpoint_paths`` (e.g. after a restart)."""
        self.wait_until_finished()  # its steps run on the same communicator
        self._comm.begin("Saver.recover_last_checkpoints")
        kept, err = [], None
        if self._comm.is_coordinator:
            now = time.time()
            try:
                for path in checkpoint_paths:
                    loc = self._resolve(names.index_name(path))
                    if storage.exists(loc):
                        kept.append((path, storage.info(loc)["mtime"] or now))
            except Exception as exc:  # noqa: BLE001
                err = exc
        self._comm.agree(err, "recovering the list of checkpoints")
        self._last_checkpoints = sorted(self._comm.bcast(kept), key=lambda pt: pt[1])

    def _resolve(self, path: str) -> storage.Location:
        return storage.resolve(path, self.storage_options, self.fs)

    def _prefix(self, save_path: str | os.PathLike, global_step: Any) -> str:
        save_path = os.fspath(save_path)
        if global_step is None:
            prefix = save_path
        else:
            step = _step_number(global_step)
            prefix = f"{save_path}-{step:08d}" if self.pad_step_number else f"{save_path}-{step}"
        _check_prefix(prefix)
        return prefix

    # ------------------------------------------------------------------------- save
    def _local_arrays(self, prefix: str) -> tuple[list[np.ndarray], list[BlockMeta]]:
        """This rank's arrays (in the order of ``self._layout``), checked, and what it tells
        the other ranks about them."""
        layout = self._layout
        arrays = layout.arrays()
        metas = layout.cached_metas(arrays)
        if metas is not None:  # same shapes and dtypes as last time: already checked
            return arrays, metas
        metas = []
        add_meta, to_tf = metas.append, dtypes.to_tf
        strings = False
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
                strings = True
            else:
                nbytes = arr.nbytes
            add_meta(BlockMeta(name, tf_type, var.global_shape, Block(var.offset, var.shape), nbytes))
        if strings:  # their sizes and contents change without their shapes: check every time
            layout.forget()
        else:
            layout.remember(arrays, metas)
        return arrays, metas

    def save(
        self,
        save_path: str | os.PathLike,
        global_step: Any = None,
        latest_filename: str | None = "checkpoint",
        write_state: bool = True,
        *,
        write_meta_graph: bool = False,
        blocking: bool = True,
    ) -> str | SaveHandle:
        """Write a checkpoint and return its prefix (``save_path-<step>`` with a step).

        Collective; every rank returns the same prefix or raises the same error. A failed
        save commits nothing: the previous checkpoint stays the latest.

        With ``blocking=False`` it returns a :class:`SaveHandle` as soon as this rank's
        variables are checked and copied into staging buffers (training may change them
        right away); planning, the writes and the commit go on in a background thread. ``handle.result()`` gives
        the prefix or raises the save's error. A later save or restore, and interpreter
        exit, wait for it first, so a checkpoint is never silently dropped.
        """
        with gcpause.paused():  # the background part of a non-blocking save runs with it on
            return self._save(save_path, global_step, latest_filename, write_state, blocking)

    def _save(self, save_path, global_step, latest_filename, write_state, blocking) -> str | SaveHandle:
        self.wait_until_finished()
        self._comm.begin("Saver.save")
        try:
            prefix = self._prefix(save_path, global_step)
            loc = self._resolve(prefix)
            if loc.is_s3 and "/" not in loc.path.strip("/"):
                raise InvalidArgumentError(f"cannot save to {prefix!r}: the prefix needs a name inside the bucket")
        except Exception as exc:  # tell the other ranks in their step 1 rather than leave them waiting
            self._comm.agree(exc, f"saving {os.fspath(save_path)}")
            raise
        arrays, metas = self._checked_arrays(prefix, self._save_key(prefix, loc, latest_filename, write_state, blocking))
        if blocking:
            return self._plan_write_commit(prefix, loc, arrays, metas, latest_filename, write_state)
        if self._comm.size > 1 and not self._comm.thread_multiple:
            raise FailedPreconditionError(
                "a non-blocking save needs MPI initialized with MPI_THREAD_MULTIPLE "
                "(mpi4py's default); this MPI provides less"
            )
        # Only the copy happens now; planning (an all-gather), writing and the commit run
        # in the background on the Saver's own communicator.
        layout = self._layout
        token = metas if metas is layout.metas else None  # stands for these shapes and dtypes
        copies = self._staging.restage(token, arrays)
        if copies is None:
            keys = [(name, var.offset) for name, var in zip(layout.names, layout.variables, strict=True)]
            copies = self._staging.stage(keys, arrays, token)
        handle = SaveHandle(prefix)
        thread = threading.Thread(
            target=handle._run,
            args=(self._plan_write_commit, prefix, loc, copies, metas, latest_filename, write_state),
            name=f"shardsave-save-{prefix}",
        )
        self._pending = handle
        register_exit_join(self)
        thread.start()
        handle._thread = thread
        return handle

    def wait_until_finished(self) -> None:
        """Wait for a pending non-blocking save; raise its error if nobody has seen it."""
        handle, self._pending = self._pending, None
        if handle is not None:
            handle._join()
            if handle._error is not None and not handle._error_seen:
                handle._error_seen = True
                raise handle._error

    def _save_key(self, prefix: str, loc: storage.Location, latest_filename, write_state, blocking) -> dict:
        """What every rank must pass alike to ``save``: the prefix (as given, and where it
        leads: a relative one on ranks with different working directories) and every option
        that changes what is written (compared in step 1, before anything is)."""
        return {
            "prefix": prefix, "location": loc.url, "latest_filename": latest_filename,
            "write_state": bool(write_state), "blocking": bool(blocking), "fsync": self.fsync,
            "max_to_keep": self.max_to_keep, "keep_checkpoint_every_n_hours": self.keep_checkpoint_every_n_hours,
            "save_relative_paths": self.save_relative_paths, "check_replicas": self.check_replicas,
        }

    def _checked_arrays(self, prefix: str, key: dict | None = None):
        """Step 1: list and check this rank's blocks; every rank raises if any rank failed
        or the ranks' ``key`` (prefix and options) differ."""
        arrays: list[np.ndarray] = []
        metas: list[BlockMeta] = []
        err = None
        try:
            arrays, metas = self._local_arrays(prefix)
        except Exception as exc:  # noqa: BLE001 - reported to every rank by agree()
            err = exc
        self._comm.agree(err, f"saving {prefix}", key=key)
        return arrays, metas

    def _plan_write_commit(self, prefix, loc, arrays, metas, latest_filename, write_state) -> str:
        """Step 2: agree on a plan (who writes which block); then write and commit."""
        comm = self._comm
        layout = self._layout
        # The plan of the last save still holds if no rank's blocks changed since: one
        # small all-reduce instead of gathering every rank's metadata and planning again.
        cached = layout.plan if metas is layout.metas else None
        if comm.all_true(cached is not None):
            plan, keys, indices, empties = cached
        else:
            try:
                plan = make_save_plan(comm.allgather(metas))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"saving {prefix}: {exc}") from None
            writes = plan.writes[comm.rank]
            keys = [entry_key(a.name, a.extents) for a in writes]
            indices = [a.index for a in writes]
            # a plain entry always has the global shape: a zero-size tensor split over
            # ranks is stored whole, as one empty entry
            variables = layout.variables
            empties = [(pos, variables[a.index].global_shape) for pos, a in enumerate(writes)
                       if a.extents is None and arrays[a.index].shape != variables[a.index].global_shape]
            if metas is layout.metas:
                layout.plan = (plan, keys, indices, empties)
        todo = [arrays[i] for i in indices]
        for pos, shape in empties:
            todo[pos] = np.empty(shape, dtype=todo[pos].dtype)
        replicas = [(n, arrays[i], pos) for n, i, pos in plan.replica_items[comm.rank]] if self.check_replicas else []
        return self._write_and_commit(prefix, loc, plan, (keys, todo), latest_filename, write_state, replicas)

    def _write_and_commit(self, prefix, loc, plan, todo, latest_filename, write_state, replicas=()) -> str:
        """Steps 3-5: prepare the directory, write this rank's data file, commit."""
        comm = self._comm
        what = f"saving {prefix}"
        # The directory exists, an interrupted save of this prefix is finished or undone.
        err = None
        mode = None
        if comm.is_coordinator:
            try:
                mode = commit.prepare(loc, fsync=self.fsync)
            except Exception as exc:  # noqa: BLE001
                err = exc
        comm.agree(err, what)
        mode = comm.bcast(mode)

        data_loc = loc.with_path(mode.data_path(loc.path, comm.rank, comm.size))
        entries: tuple = ([], b"", ())
        err = None
        out = None
        masks: list[int] = []
        copies = ReplicaCrcs(replicas)  # of the copies another rank writes, while this one writes
        replica_crcs: list[tuple[int, int]] = []
        try:
            out = storage.Writer(data_loc, fsync=self.fsync)
            entries = write_data_file(out, *todo, comm.rank, masks)
            out.close()
            replica_crcs = copies.result(masks)
        except Exception as exc:  # noqa: BLE001
            err = exc
            if out is not None:
                out.abort()
        try:
            comm.agree(err, what)
        except Exception:
            storage.remove([data_loc])
            raise

        gathered = comm.gather((encode_rank_part(*entries, plan.sliced), out.written if out else 0, replica_crcs,
                                out.etag if out else None))
        err = None
        timestamp = time.time()
        if comm.is_coordinator:
            try:
                checked = checked_replicas(prefix, plan, [g[:3] for g in gathered])
                reports = [(part, written, g[3]) for (part, written), g in zip(checked, gathered, strict=True)]
                self._commit(loc, mode, prefix, plan.sliced, reports, latest_filename, write_state, timestamp)
            except Exception as exc:  # noqa: BLE001
                err = exc
        comm.agree(err, what)
        timestamp = comm.bcast(timestamp)
        kept, _, self._next_checkpoint_time, self._last_preserved_timestamp = self._retention(prefix, timestamp)
        self._last_checkpoints = kept
        return prefix

    def _commit(self, loc, mode, prefix, sliced, gathered, latest_filename, write_state, timestamp) -> None:
        index = merge_index(
            len(gathered), [part for part, _, _ in gathered],
            {name: (dt, shape) for name, (dt, shape, _) in sliced.items()},
        )
        reports = [(written, etag) for _, written, etag in gathered]
        commit.commit(loc, mode, reports, index, f"saving {prefix}", fsync=self.fsync)
        kept, doomed, _, preserved = self._retention(prefix, timestamp)
        if write_state:
            self._write_state(kept or [(prefix, timestamp)], latest_filename, preserved)
        for path in doomed:
            self._delete_expired(loc, path)

    def _delete_expired(self, loc: storage.Location, path: str) -> None:
        """Delete a checkpoint that retention let go, if it is one of the directory of
        ``loc`` (the checkpoint just saved); one elsewhere (a state file can name any path)
        is only dropped from the list, with a warning."""
        old = self._resolve(path)
        if storage.same_path(old, loc):  # the one just saved, spelled differently
            return
        if storage.is_directly_in(old, loc.parent):
            delete_checkpoint_files(old)
        else:
            warnings.warn(
                f"retention: not deleting checkpoint {old.url}: it is not in {loc.parent.url}, the "
                f"directory of {loc.url}; shardsave deletes only checkpoints of the directory it saves to",
                stacklevel=2,
            )

    def _retention(self, prefix: str, timestamp: float):
        """TF's retention after saving ``prefix``, computed without changing the Saver.

        Returns the checkpoints kept (oldest first), those to delete, and the next
        preservation time and last preserved timestamp. It is a pure function of the Saver's
        state, the prefix and the coordinator's timestamp, so the coordinator (which writes
        the state file and deletes) and every other rank (which only remember) agree.
        """
        next_time, preserved = self._next_checkpoint_time, self._last_preserved_timestamp
        if not self.max_to_keep:
            return [], [], next_time, preserved
        kept = [(p, t) for p, t in self._last_checkpoints if p != prefix] + [(prefix, timestamp)]
        doomed = []
        while len(kept) > self.max_to_keep:
            path, t = kept.pop(0)
            if t > next_time:  # kept on disk for keep_checkpoint_every_n_hours, off the list
                next_time += self.keep_checkpoint_every_n_hours * 3600
                preserved = t
            else:
                doomed.append(path)
        return kept, doomed, next_time, preserved

    def _write_state(self, kept: list[tuple[str, float]], latest_filename, preserved: float | None) -> None:
        prefix = kept[-1][0]
        checkpoint_state.update_checkpoint_state(
            checkpoint_state.dirname(prefix),
            prefix,
            [p for p, _ in kept],
            latest_filename=latest_filename,
            all_model_checkpoint_timestamps=[t for _, t in kept],
            last_preserved_timestamp=preserved,
            save_relative_paths=self.save_relative_paths,
            storage_options=self.storage_options,
            fs=self.fs,
        )

    # ---------------------------------------------------------------------- restore
    def restore(self, save_path: str | os.PathLike) -> None:
        """Give every variable its value from the checkpoint at ``save_path``.

        Collective. Each rank reads only the bytes its own blocks need, whatever the
        layout the checkpoint was saved with. On any error on any rank every rank raises
        and no variable changes: every byte is checked against its checksum before the
        first is written into a variable's own array (see ``restore_in_place``). The
        exceptions: the operating system failing to read the checked bytes a second time,
        or a data file written to in between; the error then names the file and the
        variables left with partial values.
        """
        if save_path is None:
            raise InvalidArgumentError("cannot restore: save_path is None")
        with gcpause.paused():
            self._restore(save_path)

    def _restore(self, save_path: str | os.PathLike) -> None:
        self.wait_until_finished()
        comm = self._comm
        comm.begin("Saver.restore")
        prefix = os.fspath(save_path)
        what = f"restoring {prefix}"
        try:
            loc = self._resolve(prefix)
        except Exception as exc:  # tell the other ranks in their step 1 rather than leave them waiting
            comm.agree(exc, what)
            raise
        index = read_index(loc, comm, what, key={"path": prefix, "location": loc.url}, recover=True,
                           fsync=self.fsync)
        err = None
        found = _Found([], [], [], [], [])
        stats = LoadStats()
        updates: list[tuple[Variable, np.ndarray]] = []
        small_arrays: list[np.ndarray] = []
        with InPlaceLoad(loc, index) as in_place:
            try:
                found = self._targets(prefix, index, live=self.restore_in_place and loc.is_local)
                files = in_place.files  # each data file's size looked up once
                load(loc, index, found.fresh, stats, files)
                in_place.check(found.live, stats)
                if found.small_names:  # these arrays already have their variables' shapes
                    small_arrays = load_small(loc, index, found.small_names, stats, files)
                self.last_restore_stats = stats
                updates = [(var, _finish(var, arr)) for var, arr in found.updates]
            except Exception as exc:  # noqa: BLE001
                err = exc
            comm.agree(err, what)  # every byte is checked on every rank; nothing has changed yet
            try:
                in_place.fill(stats)
            except Exception as exc:  # noqa: BLE001
                names = ", ".join(repr(t.name) for t in found.live)
                err = DataLossError(
                    f"{what}: reading the checked bytes again failed ({exc}); the variables "
                    f"being written in place ({names}) hold partial values: restore them again"
                )
            comm.agree(err, what)  # collective even where there is nothing to fill
        for var, arr in updates:
            var._set(arr)
        for var, arr in zip(found.small_vars, small_arrays, strict=True):
            var._set(arr)

    def _targets(self, prefix: str, index: Index, live: bool) -> _Found:
        """What to read: targets for the general loader (fresh arrays, and with ``live``
        the variables' own arrays where they can take the values), and the names and
        variables of whole small tensors for ``load_small``.

        The common case (a whole small plain tensor of the same dtype and shape) is
        recognized column-wise; everything else, errors included, goes through the
        per-variable checks.
        """
        layout = self._layout
        names, variables = layout.names, layout.variables
        entries = index.entries
        rows = list(map(entries.row.get, names))
        if not variables or None in rows:
            return self._general_targets(prefix, index, zip(names, variables, strict=True), live)
        c = entries.columns
        rows_array = np.array(rows)
        tf_types = c.dtype[rows_array]
        same = small_plain_rows(c, rows_array)
        try:
            numpy_of = {t: dtypes.to_numpy(t) for t in set(tf_types[same].tolist())}
        except ValueError:
            return self._general_targets(prefix, index, zip(names, variables, strict=True), live)
        stored = [numpy_of.get(t) for t in tf_types.tolist()]
        shapes = [c.shape[r] for r in rows]
        same &= layout.whole
        same &= np.fromiter(map(operator.eq, stored, layout.dtypes), bool, len(rows))
        same &= np.fromiter(map(operator.eq, shapes, layout.shapes), bool, len(rows))
        small = np.flatnonzero(same).tolist()
        rest = [(names[i], variables[i]) for i in np.flatnonzero(~same).tolist()]
        found = self._general_targets(prefix, index, rest, live)
        found.small_names[:0] = [names[i] for i in small]
        found.small_vars[:0] = [variables[i] for i in small]
        return found

    def _general_targets(self, prefix: str, index: Index, pairs: Iterable[tuple[str, Variable]],
                         live: bool) -> _Found:
        found = _Found([], [], [], [], [])
        written: set[int] = set()  # ids of the arrays written in place
        numpy_of: dict[int, np.dtype] = {}
        for name, var in pairs:
            full = index.entries.get(name)
            if full is None:
                close = difflib.get_close_matches(name, list(index.entries), n=3, cutoff=0.5)
                hint = f"; close names in the checkpoint: {', '.join(map(repr, close))}" if close else ""
                raise NotFoundError(f"{prefix}: variable {name!r} not found in checkpoint{hint}")
            stored = numpy_of.get(full.dtype)
            if stored is None:
                stored = numpy_of[full.dtype] = stored_dtype(prefix, name, full.dtype)
            if stored != var.dtype and not (dtypes.is_string(stored) and dtypes.is_string(var.dtype)):
                raise InvalidArgumentError(
                    f"{prefix}: variable {name!r} has dtype {var.dtype}, the checkpoint holds "
                    f"{dtypes.tf_name(full.dtype)}"
                )
            if var.shape == full.shape and var.global_shape == full.shape and is_small_plain(full):
                found.small_names.append(name)
                found.small_vars.append(var)
                continue
            if tuple(var.global_shape) != tuple(full.shape):
                check_shape(prefix, name, full.shape)
                same_size = math.prod(var.global_shape) == math.prod(full.shape)
                if not (self.reshape and same_size and not var.is_sliced):
                    raise InvalidArgumentError(
                        f"{prefix}: variable {name!r} has shape {list(var.global_shape)}, the "
                        f"checkpoint holds shape {list(full.shape)}"
                        + ("" if self.reshape else " (reshape=True allows this when sizes agree)")
                    )
                out = np.empty(full.shape, dtype=stored)
                found.fresh.append(Target(name, Block.whole(full.shape), out))
                found.updates.append((var, out))
                continue
            own = _own_array(var, stored) if live else None
            if own is not None and id(own) not in written:  # one variable under two names: new arrays
                written.add(id(own))
                found.live.append(Target(name, var.block, own))
                continue
            out = np.empty(var.shape, dtype=stored)
            found.fresh.append(Target(name, var.block, out))
            found.updates.append((var, out))
        return found


class _Found(NamedTuple):
    """What a restore reads, and into what (``Saver._targets``)."""

    fresh: list[Target]  # into new arrays, adopted by ``updates``' variables at the end
    updates: list[tuple[Variable, np.ndarray]]
    live: list[Target]  # into the variables' own arrays, in two passes (in_place.py)
    small_names: list[str]  # whole small tensors for ``load_small``, and their variables
    small_vars: list[Variable]


IN_PLACE_MIN_BYTES = 1 << 20
"""Smaller arrays are restored into fresh ones: they are cheap to allocate, and read in bulk."""


def _own_array(var: Variable, dtype: np.dtype) -> np.ndarray | None:
    """The variable's array if a restore can write into it: the right dtype and shape,
    C-contiguous, writable, and large enough for two passes to pay off."""
    arr = var._value
    if (
        arr is None
        or arr.dtype != dtype
        or arr.dtype.hasobject
        or arr.shape != var.shape
        or arr.nbytes < IN_PLACE_MIN_BYTES
        or not arr.flags.c_contiguous
        or not arr.flags.writeable
    ):
        return None
    return arr


def _step_number(global_step: Any) -> int:
    """``global_step`` as an int: a Python or numpy integer, a 0-d integer array or a
    Variable holding one; anything else (1.5, 2.0, "3") is an error, not truncated."""
    value = global_step.value if isinstance(global_step, Variable) else global_step
    if isinstance(value, int):  # numbers of any size, bool as TF takes it
        return int(value)
    arr = np.asarray(value) if isinstance(value, np.ndarray | np.generic) else None
    if arr is None or arr.ndim != 0 or arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"global_step must be an integer, got {value!r}")
    return int(arr)


def _check_prefix(prefix: str) -> None:
    """A prefix must end in a file name: ``P.index`` and ``P.data-*`` are made by appending
    to it, so ``.``, ``..`` or a trailing slash would put them beside the directory."""
    name = prefix.rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        ending = f"{name!r}" if name else "a slash"
        raise InvalidArgumentError(
            f"cannot save to {prefix!r}: a checkpoint prefix must end in a file name (its files "
            f"are <prefix>.index and <prefix>.data-*), not in {ending}"
        )


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


def _finish(var: Variable, arr: np.ndarray) -> np.ndarray:
    if arr.shape != var.shape:
        arr = arr.reshape(var.shape)
    return arr


class ReplicaCrcs:
    """The masked CRC32C of every replica this rank holds, as ``(replica number, crc)``:
    computed in a second thread for the copies it does not write, taken from the writer's
    entries for those it does."""

    def __init__(self, replicas: list[tuple[int, np.ndarray, int]]):
        self._replicas = replicas
        self._copies: dict[int, int] = {}
        self._error: BaseException | None = None
        self._thread = None
        if any(pos < 0 for _, _, pos in replicas):
            self._thread = threading.Thread(target=self._compute, name="shardsave-replica-crcs", daemon=True)
            self._thread.start()

    def _compute(self) -> None:
        try:
            copies = [(number, array) for number, array, pos in self._replicas if pos < 0]
            self._copies = dict(zip([n for n, _ in copies], entry_crcs([a for _, a in copies]), strict=True))
        except Exception as exc:  # noqa: BLE001 - raised by result()
            self._error = exc

    def result(self, masks: list[int]) -> list[tuple[int, int]]:
        """``masks``: the entry CRCs of this rank's writes, which must have succeeded."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return [(number, self._copies[number] if pos < 0 else masks[pos]) for number, _, pos in self._replicas]


def checked_replicas(prefix: str, plan, gathered: list[tuple]) -> list[tuple]:
    """The coordinator's check that every rank holding a replica holds the same bytes; the
    gathered ``(index part, bytes written, replica CRCs)`` without the CRCs."""
    holders: dict[int, dict[int, list[int]]] = {}  # replica -> crc -> ranks
    for rank, (_, _, crcs) in enumerate(gathered):
        for number, crc in crcs:
            holders.setdefault(number, {}).setdefault(crc, []).append(rank)
    differ = [(number, by_crc) for number, by_crc in sorted(holders.items()) if len(by_crc) > 1]
    if differ:
        shown = "; ".join(_replica_difference(plan.replicas[number], by_crc) for number, by_crc in differ[:5])
        more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
        raise InvalidArgumentError(
            f"saving {prefix}: {shown}{more}; nothing was committed. A variable held whole by several "
            "ranks is stored once, so its copies must be equal; to save per-rank state (e.g. RNG keys) "
            "give it a leading rank axis (global_shape=(size, ...), offset=(rank, ...)), or pass "
            "Saver(check_replicas=False) to store one rank's copy"
        )
    return [(part, written) for part, written, _ in gathered]


def _replica_difference(replica: tuple[str, Block], by_crc: dict[int, list[int]]) -> str:
    name, block = replica
    where = "" if not any(block.offset) else f" (block at offset {list(block.offset)})"
    groups = sorted(by_crc.values(), key=min)
    values = ", ".join(f"rank(s) {', '.join(map(str, ranks))} value {_letter(i)}" for i, ranks in enumerate(groups))
    return f"variable {name!r}{where} differs between the ranks that hold it: {values}"


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else str(i + 1)


def read_index(loc: storage.Location, comm: Comm, what: str, key: dict | None = None, *, recover: bool = False,
               fsync: bool = True) -> Index:
    """The coordinator reads ``P.index`` once; every rank gets its parsed form. ``key``:
    what the ranks must agree on (see ``Comm.agree``).

    ``recover``: first finish a save of ``P`` that was interrupted after its commit point
    (commit.py), so a restore never meets an old index naming new data files."""
    data = None
    err = None
    if comm.is_coordinator:
        try:
            if recover:
                # without the right to list (an S3 reader with GetObject only) or to rename, a
                # restore reads as before: a checksum error if it meets an unfinished commit
                with contextlib.suppress(PermissionDeniedError):
                    commit.recover(loc, roll_back=False, fsync=fsync)
            data = read_index_bytes(loc)
        except Exception as exc:  # noqa: BLE001
            err = exc
    comm.agree(err, what, key=key)
    data = comm.bcast(data)
    return parse_index_or_raise(loc, data)


def read_index_bytes(loc: storage.Location) -> bytes:
    index_loc = loc.with_path(names.index_name(loc.path))
    try:
        return storage.read_bytes(index_loc)
    except NotFoundError as exc:
        if storage.missing_bucket(exc):  # the bucket's name is wrong, not the checkpoint's
            raise
        raise NotFoundError(
            f"no checkpoint at {loc.url}: {index_loc.url} does not exist"
        ) from None


def parse_index_or_raise(loc: storage.Location, data: bytes) -> Index:
    try:
        return parse_index(data)
    except (DecodeError, ValueError, IndexError) as exc:
        raise DataLossError(f"{loc.url}.index is not a valid checkpoint index: {exc}") from exc


def delete_checkpoint_files(loc: storage.Location) -> None:
    """Remove a checkpoint: its index first (so it stops counting), then its data files."""
    storage.remove([loc.with_path(names.index_name(loc.path))])
    storage.remove([f for f, _ in storage.data_files(loc.parent, loc.name)])
    storage.remove([loc.with_path(names.meta_name(loc.path))])
