"""The checkpoints of a manager's directory: ``<name>-<step>`` prefixes, found through the
state file and the directory's listing (a coordinator-only read; the result is broadcast).

The state file lists what the last manager kept, with timestamps. The listing adds what
it misses: a checkpoint committed after the newest one it lists (its save died between
the commit and the state file's update) is adopted, timed by its index's mtime. Older
``<name>-<step>`` checkpoints that the state file does not list were preserved by
``keep_checkpoint_every_n_hours`` (TF2 keeps those off the list for good) or belong to
no manager: they are never deleted, but ``restore_or_initialize`` may still fall back to
them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import checkpoint_state, storage
from .._comm import Comm
from ..errors import InvalidArgumentError, ShardsaveError
from ..format import names
from ..metadata import read_metadata
from .policy import Entry

log = logging.getLogger("shardsave")

MANAGER_KEY = "shardsave.manager"
"""The key of the manager's own record (step, metrics) in a checkpoint's metadata dict."""


@dataclass(frozen=True)
class Found:
    tracked: list[Entry]  # what retention manages, by step
    committed: list[Entry]  # every committed <name>-<step> of the directory, by step
    last_preserved: float | None  # from the state file (None without one)


def prefix_of(directory: str, name: str, step: int) -> str:
    return checkpoint_state.join(directory, f"{name}-{step}")


def step_of(path: str, name: str) -> int | None:
    """The step of ``.../<name>-<step>`` (a canonical decimal), else None."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    match = re.fullmatch(re.escape(name) + r"-(0|[1-9][0-9]*)", base)
    return int(match.group(1)) if match else None


def _same_dir(a: str, b: str) -> bool:
    if checkpoint_state.is_url(a) or checkpoint_state.is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def find(
    directory: str,
    name: str,
    *,
    storage_options: dict | None,
    fs: Any,
    with_metrics: bool,
) -> Found:
    """The directory's checkpoints (coordinator only: it reads the storage)."""
    now = time.time()
    listing = storage.files_in(storage.resolve(directory, storage_options, fs))
    on_disk: dict[int, float] = {}
    for file_name, info in listing.items():
        prefix = names.prefix_of_index(file_name)
        step = None if prefix is None else step_of(prefix, name)
        if step is not None:
            on_disk[step] = min(info.get("mtime") or now, now)
    state = checkpoint_state.get_checkpoint_state(directory, storage_options=storage_options, fs=fs)
    tracked: dict[int, float] = {}
    last_preserved = None
    if state is not None:
        last_preserved = min(state.last_preserved_timestamp, now)
        stamps = list(state.all_model_checkpoint_timestamps)
        paths = state.all_model_checkpoint_paths
        stamps = stamps if len(stamps) == len(paths) else [last_preserved] * len(paths)
        for path, stamp in zip(paths, stamps, strict=True):
            step = step_of(path, name)
            if step in on_disk and _same_dir(checkpoint_state.dirname(path), directory):
                tracked[step] = min(stamp, now)
    newest_listed = max(tracked, default=-1)
    if state is None or not state.all_model_checkpoint_paths:
        newest_listed = -1
    for step, mtime in on_disk.items():
        if step > newest_listed:
            tracked.setdefault(step, mtime)

    def entry(step: int, stamp: float) -> Entry:
        prefix = prefix_of(directory, name, step)
        return Entry(step, prefix, stamp, _metrics(prefix, storage_options, fs) if with_metrics else {})

    tracked_entries = {s: entry(s, t) for s, t in sorted(tracked.items())}
    committed = [
        tracked_entries.get(s) or Entry(s, prefix_of(directory, name, s), t) for s, t in on_disk.items()
    ]
    return Found(list(tracked_entries.values()), sorted(committed, key=lambda e: e.step), last_preserved)


def _metrics(prefix: str, storage_options: dict | None, fs: Any) -> dict:
    """The metrics a manager saved with ``prefix``; {} if unreadable (it then ranks last)."""
    try:
        meta = read_metadata(prefix, storage_options=storage_options, fs=fs) or {}
    except ShardsaveError as exc:
        log.warning("checkpoint %s: cannot read its metrics (%s); it ranks last for best-N", prefix, exc)
        return {}
    record = meta.get(MANAGER_KEY)
    metrics = record.get("metrics") if isinstance(record, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def own_comm(comm: Any, saver: Any, timeout: float | None) -> Comm:
    """A duplicate of ``comm`` (default: the Saver's communicator) for the manager alone."""
    if isinstance(comm, Comm):
        comm = comm._comm
    elif comm is None:
        comm = saver.comm._comm
    return Comm(None, timeout) if comm is None else Comm.create(comm, timeout)


def plain_metrics(metrics: dict | None) -> dict:
    """``metrics`` with numpy scalars as Python numbers (JSON has no float32)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise InvalidArgumentError(f"metrics must be a dict, not {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0:
            value = value.item()
        out[str(name)] = value
    return out
