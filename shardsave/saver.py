"""The Saver: collective save and restore of a set of variables, as ``tf.train.Saver``.

This module is the TF surface: the forms of ``var_list``, the options, and the list of
checkpoints retention keeps (retention.py). ``save`` runs the five steps of
save/protocol.py (check and agree, plan, prepare the directory, write, commit), in a
background thread after the first with ``blocking=False``; ``restore`` runs
restore/protocol.py. Both are collective over the Saver's own duplicate of ``comm``.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import gcpause, retention, storage
from . import metadata as metadata_tensor
from ._comm import Comm
from .errors import InvalidArgumentError
from .format.names import METADATA_NAME
from .format.state import MAX_STATE_ENTRIES
from .restore import protocol as restore_protocol
from .save import protocol as save_protocol
from .save.layout import SaveLayout
from .save.pending import SaveHandle, register_exit_join
from .save.staging import StagingBuffers
from .tree import TreeState, is_tree
from .variables import PartitionedVariable, Variable, global_variables

if TYPE_CHECKING:
    from .restore.reads import LoadStats

VarList = Mapping[str, Any] | Iterable[Any] | None


def _blocks_of(var: Any) -> list[Variable]:
    if isinstance(var, Variable):
        return [var]
    if isinstance(var, PartitionedVariable):
        return list(var.parts)
    if isinstance(var, list | tuple) and all(isinstance(v, Variable) for v in var):
        return list(var)
    raise InvalidArgumentError(
        f"cannot save {var!r}: expected a Variable, a PartitionedVariable or a list of parts"
    )


def _saveables(var_list: VarList) -> dict[str, list[Variable]]:
    """``{name in checkpoint: this rank's blocks}`` from TF's forms of ``var_list``."""
    if var_list is None:
        var_list = global_variables()
    if isinstance(var_list, Mapping):
        if "" in var_list:  # the empty key is the index's header entry
            raise InvalidArgumentError(
                "var_list has a variable under the name '': a variable name must not be empty"
            )
        return {str(name): _blocks_of(v) for name, v in var_list.items()}
    out: dict[str, list[Variable]] = {}
    for var in var_list:
        if type(var) is Variable and var.name not in out:  # the common case, without the checks
            out[var.name] = [var]
            continue
        name = getattr(var, "name", None)
        if name is None:
            raise InvalidArgumentError(f"cannot save {var!r}: it has no name")
        if name in out:
            raise InvalidArgumentError(f"at least two variables have the same name: {name!r}")
        out[name] = _blocks_of(var)
    return out


class Saver:
    """Saves and restores variables; every method is collective over ``comm``.

    ``var_list`` is one of TF's forms (None: the default graph's variables; a list of
    Variables; a mapping of names to Variables, PartitionedVariables or lists of parts) or a
    tree: nested dicts, lists and tuples of numpy arrays, torch tensors, JAX arrays and
    scalars, each leaf saved under its path joined with ``/`` (tree.py); ``saver.state`` is
    then its TreeState, ``restore`` returns the restored tree.

    ``comm`` defaults to ``MPI.COMM_WORLD``; the Saver duplicates it once, here, so
    constructing a Saver is collective too. ``storage_options`` (or a ready fsspec
    ``fs``) apply to every path given to ``save`` and ``restore``; they go to fsspec
    (``endpoint_url``, ``key``, ``config_kwargs``...) but for shardsave's own S3 upload
    options, which may also accompany ``fs``: ``upload_part_size`` (bytes, 5 MiB to 5 GiB;
    default: from each data file's size, 8 to 128 MiB) and ``upload_concurrency`` (parts of
    one file in flight, default 8); see ``shardsave.storage.s3``.

    ``restore_in_place`` (default True): from a local or shared filesystem, a restore
    writes into the arrays the variables already hold (of at least 1 MiB, same dtype and
    shape, C-contiguous, writable), as PyTorch DCP does, instead of making new ones; it
    checks every byte first, so a damaged checkpoint still changes nothing (the bytes are
    read twice: a check pass, then a fill pass, normally from the page cache). "direct":
    in place in one pass, each range read straight into its array and checked as it lands;
    on damage the DataLossError names the variables partly overwritten, those restored
    whole and those untouched (attributes ``partly``, ``restored``, ``untouched``), so use
    it when reading twice costs (checkpoints larger than the page cache, filesystems that
    do not cache) and a failed restore may be redone. False: every array is new and the
    variables adopt them at the end (twice the memory).

    ``timeout`` (seconds; None waits forever): every collective step of save, restore and
    the constructor waits at most this long for the other ranks, then raises
    DeadlineExceededError naming the ranks that did not arrive (e.g. a rank that never
    called ``save``); the Saver is unusable afterwards. ``check_replicas`` (default True):
    a variable held whole by several ranks must have the same bytes on each (their
    CRC32C are compared before the commit); False stores one rank's copy unchecked.

    ``files_per_node`` (default None: every rank writes its own data file): the ranks of
    each node (ranks sharing memory, or ``SHARDSAVE_NODE_ID``, as for the fast tier) send
    their bytes over MPI to k of them, which write k data files per node (fewer files for
    Lustre's or GPFS's metadata servers); k at least a node's ranks: every rank writes.
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
        restore_in_place: bool | Literal["direct"] = True,
        timeout: float | None = 1800.0,
        check_replicas: bool = True,
        files_per_node: int | None = None,
    ):
        self.state: TreeState | None = TreeState(var_list) if is_tree(var_list) else None
        """The tree given as ``var_list`` (tree.py), or None for TF's forms of ``var_list``."""
        self._saveables = self.state.saveables() if self.state is not None else _saveables(var_list)
        _check_reserved(self._saveables)
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
        if not (isinstance(restore_in_place, bool | np.bool_) or restore_in_place == "direct"):
            raise InvalidArgumentError(
                f"restore_in_place={restore_in_place!r}: expected True (two passes, atomic), "
                "'direct' (one pass) or False (new arrays)"
            )
        self.restore_in_place = restore_in_place if restore_in_place == "direct" else bool(restore_in_place)
        self.check_replicas = check_replicas
        if timeout is not None and (
            isinstance(timeout, bool) or not (isinstance(timeout, int | float) and timeout > 0)
        ):
            raise InvalidArgumentError(
                f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        if files_per_node is not None and (
            isinstance(files_per_node, bool)
            or not isinstance(files_per_node, numbers.Integral)
            or files_per_node < 1
        ):
            raise InvalidArgumentError(
                f"files_per_node must be a positive integer (data files per node) or None, not {files_per_node!r}"
            )
        self.files_per_node = None if files_per_node is None else int(files_per_node)
        self._comm = Comm.create(comm, timeout=timeout)
        if self.state is not None:  # per-rank leaves: one row per rank of this communicator
            self.state.bind(self._comm.rank, self._comm.size)
        self._last_checkpoints: list[tuple[str, float]] = []
        self._next_checkpoint_time = time.time() + keep_checkpoint_every_n_hours * 3600
        self._last_preserved_timestamp: float | None = None
        self.last_restore_stats: LoadStats | None = None
        self._pending: SaveHandle | None = None
        self._staging = StagingBuffers()
        self._layout = SaveLayout(self._saveables)
        self._metadata_var: Variable | None = None  # held by the coordinator only
        self._metadata_layout: SaveLayout | None = None

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
        committed = partial(retention.committed, checkpoint_paths, self._resolve)
        kept = self._comm.coordinator_only("recovering the list of checkpoints", committed)
        self._last_checkpoints = sorted(kept, key=lambda pt: pt[1])

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
    def save(
        self,
        save_path: str | os.PathLike,
        global_step: Any = None,
        latest_filename: str | None = "checkpoint",
        write_state: bool = True,
        *,
        blocking: bool = True,
        metadata: dict | None = None,
    ) -> str | SaveHandle:
        """Write a checkpoint and return its prefix (``save_path-<step>`` with a step).

        Collective; every rank returns the same prefix or raises the same error. A failed
        save commits nothing: the previous checkpoint stays the latest.

        With ``blocking=False`` it returns a :class:`SaveHandle` as soon as this rank's
        variables are checked and copied into staging buffers (training may change them
        right away); planning, the writes and the commit go on in a background thread. ``handle.result()`` gives
        the prefix or raises the save's error. A later save or restore, and interpreter
        exit, wait for it first, so a checkpoint is never silently dropped.

        ``metadata``: a JSON-serialisable dict saved in the checkpoint itself (a string
        tensor named ``shardsave.format.names.METADATA_NAME``, so it commits with it);
        the coordinator's is stored. Read it back with :func:`shardsave.read_metadata`.
        """
        with gcpause.paused():  # the background part of a non-blocking save runs with it on
            return self._save(save_path, global_step, latest_filename, write_state, blocking, metadata)

    def _save(
        self,
        save_path,
        global_step,
        latest_filename,
        write_state,
        blocking,
        metadata=None,
        retain=None,
        protocol=None,
    ) -> str | SaveHandle:
        """``retain(checkpoints, prefix, timestamp) -> retention.Retained`` replaces TF1's
        retention for this save (the CheckpointManager's policy); it must be pure, as it
        runs on every rank. ``protocol`` replaces steps 2 to 5 (the fast tier's,
        tiers/fast_save.py): ``protocol.key(key)`` is what the ranks agree on instead of
        ``key`` (their prefixes differ), ``protocol.run(job, arrays, metas)`` saves and
        ``protocol.resolve(path)`` locates the prefix."""
        self.wait_until_finished()
        self._comm.begin("Saver.save")
        resolve = self._resolve if protocol is None else protocol.resolve
        prefix, loc = save_protocol.locate(
            self._comm, save_path, lambda: self._prefix(save_path, global_step), resolve
        )
        try:
            layout = self._layout_with(metadata, prefix)
        except Exception as exc:  # in the round the others reach in check_arrays
            self._comm.agree(exc, f"saving {prefix}")
            raise
        retained = partial(retain, list(self._last_checkpoints)) if retain else self._retained
        job = save_protocol.SaveJob.of(
            self, layout, prefix, loc, latest_filename, write_state, partial(retained, prefix)
        )
        key = dict(job.key(blocking), metadata=metadata is not None)
        run = self._plan_write_commit
        if protocol is not None:
            key, run = protocol.key(key), protocol.run
        arrays, metas = save_protocol.check_arrays(self._comm, layout, prefix, key)
        if blocking:
            return run(job, arrays, metas)
        return save_protocol.start_in_background(job, arrays, metas, self._staging, run, self._adopt_pending)

    def _plan_write_commit(self, job: save_protocol.SaveJob, arrays, metas) -> str:
        """Steps 2 to 5; then every rank remembers what retention kept."""
        timestamp = save_protocol.plan_write_commit(job, arrays, metas)
        self._last_checkpoints, _, self._next_checkpoint_time, self._last_preserved_timestamp = job.retain(
            timestamp
        )
        return job.prefix

    def _layout_with(self, metadata: dict | None, prefix: str) -> SaveLayout:
        """The layout of a save: the variables', or (with metadata) a second one that adds
        the metadata tensor on the coordinator. Every rank switches alike (the key says
        whether there is metadata), so the plan each layout remembers stays the same on all."""
        if metadata is None:
            return self._layout
        value = metadata_tensor.encode(metadata, prefix)  # on every rank: all raise alike
        if self._metadata_layout is None:
            saveables = dict(self._saveables)
            if self._comm.is_coordinator:
                self._metadata_var = Variable(METADATA_NAME, value, register=False)
                saveables[METADATA_NAME] = [self._metadata_var]
            self._metadata_layout = SaveLayout(saveables)
        if self._metadata_var is not None:
            self._metadata_var._value = value
        return self._metadata_layout

    def _adopt_pending(self, handle: SaveHandle) -> None:
        self._pending = handle
        register_exit_join(self)

    def wait_until_finished(self) -> None:
        """Wait for a pending non-blocking save; raise its error if nobody has seen it."""
        handle, self._pending = self._pending, None
        if handle is not None:
            handle._wait()

    def _retained(self, prefix: str, timestamp: float) -> retention.Retained:
        """TF's retention after saving ``prefix``, without changing the Saver."""
        return retention.retain(
            self._last_checkpoints,
            prefix,
            timestamp,
            max_to_keep=self.max_to_keep,
            every_n_hours=self.keep_checkpoint_every_n_hours,
            next_time=self._next_checkpoint_time,
            preserved=self._last_preserved_timestamp,
        )

    # ---------------------------------------------------------------------- restore
    def restore(self, save_path: str | os.PathLike) -> Any:
        """Give every variable its value from the checkpoint at ``save_path``; for a Saver
        made from a tree, return the restored tree (``self.state.restored()``), else None.

        Collective. Each rank reads only the bytes its own blocks need, whatever the
        layout the checkpoint was saved with. On any error on any rank every rank raises
        and no variable changes: every byte is checked against its checksum before the
        first is written into a variable's own array (see ``restore_in_place``). The
        exceptions: the operating system failing to read the checked bytes a second time,
        or a data file written to in between; the error then names the file and the
        variables left with partial values. With ``restore_in_place="direct"`` the
        variables' own arrays are written as the bytes are checked: a failure names
        those partly overwritten, restored whole and untouched.
        """
        if save_path is None:
            raise InvalidArgumentError("cannot restore: save_path is None")
        return self._restore(os.fspath(save_path), self._resolve)

    def _restore(self, prefix: str, resolve) -> Any:
        """``restore``, reading through ``resolve(prefix) -> Location`` (the fast tier's
        served view, tiers/view.py, or this Saver's storage)."""
        with gcpause.paused():
            self.wait_until_finished()
            self._comm.begin("Saver.restore")
            restore_protocol.restore(
                self._comm,
                self._layout,
                prefix,
                resolve,
                in_place=self.restore_in_place,
                reshape=self.reshape,
                fsync=self.fsync,
                on_read=partial(setattr, self, "last_restore_stats"),
            )
        return self.state.restored() if self.state is not None else None


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


def _check_reserved(saveables: Mapping[str, Any]) -> None:
    if METADATA_NAME in saveables:
        raise InvalidArgumentError(
            f"a variable is named {METADATA_NAME!r}, the name reserved for a checkpoint's metadata "
            "(Saver.save(metadata=...)); rename it"
        )
    for name in [name for name in saveables if name[:1] == "\x00"]:
        if name.startswith("\x00"):  # the index's slice keys begin with NUL: it would read as one
            raise InvalidArgumentError(
                f"variable name {name!r} begins with a NUL character, which a checkpoint index "
                "reserves for its slice keys; rename it"
            )


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
