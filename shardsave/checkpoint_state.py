"""The state file of a checkpoint directory, and finding checkpoints through it.

Paths in the state file may be relative to its directory or absolute; the functions here
return them as a user would pass them back: joined to the directory path or URL.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
from typing import Any

from . import storage
from .errors import DataLossError, InvalidArgumentError, NotFoundError, StorageError
from .format import names
from .format.coding import DecodeError
from .format.state import MAX_STATE_BYTES, MAX_STATE_ENTRIES, CheckpointState, decode_state, encode_state

__all__ = [
    "CheckpointState",
    "checkpoint_exists",
    "get_checkpoint_state",
    "latest_checkpoint",
    "resolve_checkpoint",
    "update_checkpoint_state",
]


def is_url(path: str) -> bool:
    return "://" in path


def join(directory: str, path: str) -> str:
    """``path`` as seen from outside: relative paths are taken from ``directory``."""
    if is_url(path) or os.path.isabs(path):
        return path
    if is_url(directory):
        return posixpath.join(directory, path)
    return os.path.join(directory, path)


def dirname(prefix: str) -> str:
    if is_url(prefix):
        proto, rest = prefix.split("://", 1)
        return f"{proto}://{posixpath.dirname(rest)}"
    return os.path.dirname(prefix) or "."


def get_checkpoint_state(
    checkpoint_dir: str | os.PathLike,
    latest_filename: str | None = None,
    *,
    storage_options: dict | None = None,
    fs: Any = None,
) -> CheckpointState | None:
    """The directory's state, with paths joined to the directory; None if it has none.

    As TF, a directory that does not exist has no state; but an S3 bucket that does not
    exist raises :class:`NotFoundError` (a typo must not look like a fresh start).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    loc = storage.resolve(checkpoint_dir, storage_options, fs).child(latest_filename or "checkpoint")
    try:
        # a missing S3 bucket still raises; one byte past the cap tells that it is too big
        data = storage.read_bytes(loc, missing_ok=True, limit=MAX_STATE_BYTES + 1)
    except StorageError as exc:  # "checkpoint" is a directory, or checkpoint_dir a file
        if exc.errno in (errno.EISDIR, errno.ENOTDIR):
            return None
        raise
    if data is None:
        return None
    try:
        state = decode_state(data)
    except DecodeError as exc:
        raise DataLossError(f"{loc.url}: not a valid checkpoint state file: {exc}") from exc
    state.model_checkpoint_path = join(checkpoint_dir, state.model_checkpoint_path)
    state.all_model_checkpoint_paths = [join(checkpoint_dir, p) for p in state.all_model_checkpoint_paths]
    return state


def checkpoint_exists(prefix: str, *, storage_options: dict | None = None, fs: Any = None) -> bool:
    """True once the checkpoint at ``prefix`` is committed (its index exists)."""
    return storage.exists(storage.resolve(names.index_name(prefix), storage_options, fs))


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike,
    latest_filename: str | None = None,
    *,
    storage_options: dict | None = None,
    fs: Any = None,
) -> str | None:
    """The newest committed checkpoint listed in the directory's state file, or None.

    Unlike TF, when the newest listed checkpoint has no index (its save died half-way),
    this falls back to the newest older one that does. Every call asks the storage afresh
    (no cached listing), so it sees what other processes committed meanwhile.
    """
    state = get_checkpoint_state(checkpoint_dir, latest_filename, storage_options=storage_options, fs=fs)
    if state is None:
        return None
    candidates = [state.model_checkpoint_path] + state.all_model_checkpoint_paths[::-1]
    seen = set()
    for path in candidates:
        if not path or path in seen:
            continue
        seen.add(path)
        if checkpoint_exists(path, storage_options=storage_options, fs=fs):
            return path
    return None


def resolve_checkpoint(
    ckpt: str | os.PathLike, *, storage_options: dict | None = None, fs: Any = None
) -> str:
    """A checkpoint prefix from a prefix or a directory (through its state file)."""
    ckpt = os.fspath(ckpt)
    if checkpoint_exists(ckpt, storage_options=storage_options, fs=fs):
        return ckpt
    latest = latest_checkpoint(ckpt, storage_options=storage_options, fs=fs)
    if latest is not None:
        return latest
    raise NotFoundError(
        f"no checkpoint found at {ckpt!r}: "
        + (
            _file_hint(ckpt, storage_options, fs)
            or f"neither {ckpt}.index nor a directory with a 'checkpoint' state file naming a committed checkpoint"
        )
    )


_CHECKPOINT_FILE = re.compile(r"(.+)(\.index|\.data-\d+-of-\d+)")


def _file_hint(ckpt: str, storage_options: dict | None, fs: Any) -> str:
    """A hint when ``ckpt`` names one file of a checkpoint instead of its prefix."""
    match = _CHECKPOINT_FILE.fullmatch(ckpt)
    if match is None or not checkpoint_exists(match.group(1), storage_options=storage_options, fs=fs):
        return ""
    return f"it is a file of checkpoint {match.group(1)!r}; pass the prefix, without {match.group(2)!r}"


def update_checkpoint_state(
    save_dir: str,
    model_checkpoint_path: str,
    all_model_checkpoint_paths: list[str] | None = None,
    latest_filename: str | None = None,
    all_model_checkpoint_timestamps: list[float] | None = None,
    last_preserved_timestamp: float | None = None,
    save_relative_paths: bool = False,
    *,
    storage_options: dict | None = None,
    fs: Any = None,
    fsync: bool = True,
) -> None:
    """Write the state file atomically (TF's ``update_checkpoint_state``); ``fsync=False``
    (a Saver's ``fsync=False``) skips its fsyncs: on ext4 an fsync of even this small file
    waits for the data a save without fsync just wrote."""
    paths = list(all_model_checkpoint_paths or [])
    if not paths or paths[-1] != model_checkpoint_path:
        paths = [p for p in paths if p != model_checkpoint_path] + [model_checkpoint_path]

    def rel(p: str) -> str:
        # As TF: relative paths are stored relative to save_dir; absolute ones only
        # with save_relative_paths (and only when they lie under save_dir).
        if is_url(p) or os.path.isabs(p):
            base = save_dir.rstrip("/") + "/"
            return p[len(base) :] if save_relative_paths and p.startswith(base) else p
        return os.path.relpath(p, save_dir)

    model_checkpoint_path, paths = rel(model_checkpoint_path), [rel(p) for p in paths]
    state = CheckpointState(
        model_checkpoint_path=model_checkpoint_path,
        all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=list(all_model_checkpoint_timestamps or []),
        last_preserved_timestamp=last_preserved_timestamp or 0.0,
    )
    loc = storage.resolve(save_dir, storage_options, fs).child(latest_filename or "checkpoint")
    data = encode_state(state)
    if (
        max(len(paths), len(state.all_model_checkpoint_timestamps)) > MAX_STATE_ENTRIES
        or len(data) > MAX_STATE_BYTES
    ):
        raise InvalidArgumentError(
            f"writing {loc.url}: {len(paths)} checkpoints in {len(data)} bytes; a state file holds at "
            f"most {MAX_STATE_ENTRIES} in {MAX_STATE_BYTES} bytes (readers refuse larger ones)"
        )
    storage.publish(loc, data, fsync=fsync)
