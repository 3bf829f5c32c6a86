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

_DATA_FILE = re.compile(r"(.*)\.data-([0-9]{5,})-of-([0-9]{5,})", re.DOTALL)
_TEMP_SUFFIX = r"\.tmp[0-9a-f]+"  # storage.publish's temp files: <name>.tmp<uuid4 hex>
_INDEX_TEMP = re.compile(r".+\.index" + _TEMP_SUFFIX, re.DOTALL)
_STATE_TEMP = re.compile(r"checkpoint" + _TEMP_SUFFIX)


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
