"""TF's retention of checkpoints: which ones a save keeps (``max_to_keep``, and
``keep_checkpoint_every_n_hours``), the state file listing them, and deleting the others.

:func:`retain` is pure: the coordinator, which writes the state file and deletes, and
every other rank, which only remembers the list, compute it from the same Saver
bookkeeping and the coordinator's timestamp, so they agree without another message.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from . import checkpoint_state, storage
from .format import names


class Retained(NamedTuple):
    """The outcome of retention after one save."""

    kept: list[tuple[str, float]]  # (prefix, timestamp), oldest first; the new one last
    doomed: list[str]  # prefixes to delete
    next_time: float  # the next preservation time
    preserved: float | None  # the timestamp of the last checkpoint preserved


def retain(
    checkpoints: list[tuple[str, float]],
    prefix: str,
    timestamp: float,
    *,
    max_to_keep: int | None,
    every_n_hours: float,
    next_time: float,
    preserved: float | None,
) -> Retained:
    """TF's retention after saving ``prefix`` at ``timestamp``, given the checkpoints
    remembered so far (oldest first), the next preservation time and the last preserved
    timestamp. Nothing is changed: the caller adopts the outcome."""
    if not max_to_keep:
        return Retained([], [], next_time, preserved)
    kept = [(p, t) for p, t in checkpoints if p != prefix] + [(prefix, timestamp)]
    doomed = []
    while len(kept) > max_to_keep:
        path, t = kept.pop(0)
        if t > next_time:  # kept on disk for keep_checkpoint_every_n_hours, off the list
            next_time += every_n_hours * 3600
            preserved = t
        else:
            doomed.append(path)
    return Retained(kept, doomed, next_time, preserved)


def committed(paths: list[str], resolve: Callable[[str], storage.Location]) -> list[tuple[str, float]]:
    """``(path, time)`` of those of ``paths`` that are committed checkpoints (have an
    index), timed by the index's mtime (now where the storage has none): what a restarted
    Saver adopts."""
    now, kept = time.time(), []
    for path in paths:
        loc = resolve(names.index_name(path))
        if storage.exists(loc):
            kept.append((path, storage.info(loc)["mtime"] or now))
    return kept


def write_state(
    kept: list[tuple[str, float]],
    latest_filename: str | None,
    preserved: float | None,
    *,
    save_relative_paths: bool,
    storage_options: dict | None,
    fs: Any,
    fsync: bool = True,
) -> None:
    """The state file of the newest checkpoint's directory lists ``kept``."""
    prefix = kept[-1][0]
    checkpoint_state.update_checkpoint_state(
        checkpoint_state.dirname(prefix),
        prefix,
        [p for p, _ in kept],
        latest_filename=latest_filename,
        all_model_checkpoint_timestamps=[t for _, t in kept],
        last_preserved_timestamp=preserved,
        save_relative_paths=save_relative_paths,
        storage_options=storage_options,
        fs=fs,
        fsync=fsync,
    )


def delete_expired(loc: storage.Location, old: storage.Location) -> None:
    """Delete ``old``, a checkpoint that retention let go, if it is one of the directory
    of ``loc`` (the checkpoint just saved); one elsewhere (a state file can name any path)
    is only dropped from the list, with a warning."""
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


def delete_checkpoint_files(loc: storage.Location) -> None:
    """Remove a checkpoint: its index first (so it stops counting), then its data files."""
    storage.remove([loc.with_path(names.index_name(loc.path))])
    storage.remove([f for f, _ in storage.data_files(loc.parent, loc.name)])
    storage.remove([loc.with_path(names.meta_name(loc.path))])
