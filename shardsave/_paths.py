"""What a path on the command line names: a checkpoint's prefix, one of its files, or a
directory; and a clear error for the files of a save that never committed.

Names are parsed exactly (format/names.py), never globbed: ``P.index`` and
``P.data-00000-of-00002`` name checkpoint ``P``; a staged data file, a journal or a temp
file of an interrupted publish names no checkpoint, and says which save left it.
"""

from __future__ import annotations

import os
import posixpath

from .checkpoint_state import checkpoint_exists, resolve_checkpoint
from .errors import InvalidArgumentError, NotFoundError
from .format import names


def _split(path: str) -> tuple[str, str]:
    """``(everything up to the file name, the file name)``, as written (URLs too)."""
    name = posixpath.basename(path)
    return path[: len(path) - len(name)], name


def _not_a_checkpoint_file(path: str) -> None:
    """Raise InvalidArgumentError if ``path``'s name is one of a save's uncommitted files."""
    head, name = _split(path)
    staged = names.parse_staged_name(name)
    if staged is not None:
        final, prefix, save_id = staged
        raise InvalidArgumentError(
            f"{path} is a staged data file of save {save_id} of checkpoint {head + prefix!r}, which has "
            f"not committed (or died before it did): pass the checkpoint's prefix, or run "
            f"'shardsave gc' on its directory to clean up"
        )
    journal = names.parse_journal_name(name) or names.parse_journal_temp_name(name)
    if journal is not None:
        raise InvalidArgumentError(
            f"{path} is the commit journal of save {journal[1]} of checkpoint {head + journal[0]!r}, "
            "not a checkpoint file: pass the checkpoint's prefix ('shardsave gc' finishes or "
            "cleans up an interrupted save)"
        )
    if names.is_publish_temp(name):
        raise InvalidArgumentError(
            f"{path} is a temp file of an interrupted publish, not a checkpoint file "
            "('shardsave gc' deletes it)"
        )


def file_checkpoint(path: str, options: dict | None) -> str | None:
    """The prefix of the checkpoint ``path`` names, as a prefix or as one of its files
    (``P.index``, ``P.data-SSSSS-of-NNNNN``); None if it names neither (a directory, or
    nothing). Raises for a save's uncommitted files, and for a file of a checkpoint that
    has no index."""
    if checkpoint_exists(path, storage_options=options):
        return path
    _not_a_checkpoint_file(path)
    head, name = _split(path)
    prefix = names.prefix_of_index(name)
    if prefix:
        if checkpoint_exists(head + prefix, storage_options=options):
            return head + prefix
        raise NotFoundError(f"{path}: no such checkpoint index")
    parsed = names.parse_data_file_name(name)
    if parsed is None:
        return None
    if checkpoint_exists(head + parsed[0], storage_options=options):
        return head + parsed[0]
    raise NotFoundError(
        f"{path}: a data file of checkpoint {head + parsed[0]!r}, which has no index "
        f"{head + names.index_name(parsed[0])!r}: not a committed checkpoint "
        "(a save that died before its commit leaves such files; 'shardsave gc' deletes them)"
    )


def checkpoint_prefix(path: str | os.PathLike, options: dict | None) -> str:
    """The checkpoint a command-line path names: a prefix, a file of it, or a directory
    (the latest checkpoint its state file lists)."""
    path = os.fspath(path)
    found = file_checkpoint(path, options)
    return found if found is not None else resolve_checkpoint(path, storage_options=options)
