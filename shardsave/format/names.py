"""The file names of a checkpoint, taken literally.

A checkpoint with prefix ``P`` has ``P.index`` and data files ``P.data-SSSSS-of-NNNNN``
(shard id and count in decimal, zero-padded to at least 5 digits, as TF writes them with
``%05d``; see docs/FORMAT.md). ``P`` is any string: ``*``, ``?`` and ``[...]`` in it are
characters, never patterns, so which files belong to a checkpoint is decided by parsing
names exactly, here, and never by a glob.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

INDEX_SUFFIX = ".index"

METADATA_NAME = "_SHARDSAVE_METADATA"
"""The reserved tensor holding a checkpoint's metadata: a DT_STRING scalar of JSON text,
written by ``Saver.save(metadata=...)`` and committed with the checkpoint."""
META_SUFFIX = ".meta"

_DATA_FILE = re.compile(r"(.*)\.data-([0-9]{5,})-of-([0-9]{5,})", re.DOTALL)
_TEMP_SUFFIX = r"\.tmp[0-9a-f]+"  # storage.publish's temp files: <name>.tmp<uuid4 hex>
_INDEX_TEMP = re.compile(r".+\.index" + _TEMP_SUFFIX, re.DOTALL)
_STATE_TEMP = re.compile(r"checkpoint" + _TEMP_SUFFIX)

# The commit protocol's files (save/commit.py): a save to a prefix that may already hold a
# checkpoint writes staged data files, and its commit point is a journal.
_SAVE_ID = r"[0-9a-f]{16}"
_STAGED = re.compile(rf"(?P<final>.+)\.(?P<id>{_SAVE_ID})\.staged", re.DOTALL)
_JOURNAL = re.compile(rf"(?P<base>.+)\.index\.(?P<id>{_SAVE_ID})\.pending", re.DOTALL)
_JOURNAL_TEMP = re.compile(rf"(?P<base>.+)\.index\.(?P<id>{_SAVE_ID})\.pending{_TEMP_SUFFIX}", re.DOTALL)


def index_name(prefix: str) -> str:
    """``P.index``: the checkpoint's index, and the file whose presence makes it one."""
    return prefix + INDEX_SUFFIX


def meta_name(prefix: str) -> str:
    """``P.meta``: TensorFlow's meta graph beside a checkpoint (never written here)."""
    return prefix + META_SUFFIX


def prefix_of_index(name: str) -> str | None:
    """``P`` if ``name`` is ``P.index``, else None."""
    if name.endswith(INDEX_SUFFIX):
        return name[: -len(INDEX_SUFFIX)]
    return None


def data_file_name(prefix: str, shard_id: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


def parse_data_file_name(name: str) -> tuple[str, int, int] | None:
    """``(prefix, shard id, number of shards)`` if ``name`` is exactly a data file's name
    as :func:`data_file_name` spells it (shard id below the count), else None."""
    match = _DATA_FILE.fullmatch(name)
    if match is None:
        return None
    prefix, shard_id, num_shards = match.group(1), int(match.group(2)), int(match.group(3))
    if shard_id >= num_shards or data_file_name(prefix, shard_id, num_shards) != name:
        return None  # "0000001" is not how a data file is named
    return prefix, shard_id, num_shards


def is_data_file_of(name: str, prefix: str) -> bool:
    """Whether ``name`` is a data file of the checkpoint named ``prefix`` (literally)."""
    parsed = parse_data_file_name(name)
    return parsed is not None and parsed[0] == prefix


def data_files_of(names: Iterable[str], prefix: str) -> list[str]:
    """The names among ``names`` that are data files of the checkpoint ``prefix``."""
    return [name for name in names if is_data_file_of(name, prefix)]


def is_publish_temp(name: str) -> bool:
    """Whether ``name`` is a temp file of an interrupted publish of an index or of the
    default state file (``storage.publish`` names them ``<file>.tmp<hex digits>``). No
    file of a checkpoint has such a name: those end in ``.index``, ``.meta`` or
    ``-of-NNNNN``."""
    return _INDEX_TEMP.fullmatch(name) is not None or _STATE_TEMP.fullmatch(name) is not None


def staged_name(final: str, save_id: str) -> str:
    """A data file written by save ``save_id`` before its commit renames it to ``final``."""
    return f"{final}.{save_id}.staged"


def parse_staged_name(name: str) -> tuple[str, str, str] | None:
    """``(final name, its prefix, save id)`` of a staged data file's name, else None; the
    final name must be exactly a data file's."""
    m = _STAGED.fullmatch(name)
    parsed = parse_data_file_name(m["final"]) if m else None
    return None if parsed is None else (m["final"], parsed[0], m["id"])


def journal_name(base: str, save_id: str) -> str:
    """``P.index.<id>.pending``: the journal whose publication is a save's commit point."""
    return f"{base}{INDEX_SUFFIX}.{save_id}.pending"


def parse_journal_name(name: str) -> tuple[str, str] | None:
    """``(prefix, save id)`` if ``name`` is a journal's name, else None."""
    m = _JOURNAL.fullmatch(name)
    return None if m is None else (m["base"], m["id"])


def parse_journal_temp_name(name: str) -> tuple[str, str] | None:
    """``(prefix, save id)`` if ``name`` is a temp file of a journal's interrupted publish."""
    m = _JOURNAL_TEMP.fullmatch(name)
    return None if m is None else (m["base"], m["id"])
