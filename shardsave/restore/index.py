"""Reading a checkpoint's index: the coordinator reads ``P.index`` once and every rank
parses the same bytes (a restore, and in one process the CheckpointReader)."""

from __future__ import annotations

import contextlib

from .. import storage
from .._comm import Comm, shared_bytes
from ..errors import DataLossError, NotFoundError, PermissionDeniedError
from ..format import names
from ..format.coding import DecodeError
from ..format.index import Index, parse_index
from ..save import commit


def read_index(
    loc: storage.Location,
    comm: Comm,
    what: str,
    key: dict | None = None,
    *,
    recover: bool = False,
    fsync: bool = True,
) -> Index:
    """The coordinator reads ``P.index`` once; every rank gets its parsed form. ``key``:
    what the ranks must agree on (see ``Comm.agree``).

    ``recover``: first finish a save of ``P`` that was interrupted after its commit point
    (save/commit.py), so a restore never meets an old index naming new data files."""

    def read() -> bytes:
        if recover:
            # without the right to list (an S3 reader with GetObject only) or to rename, a
            # restore reads as before: a checksum error if it meets an unfinished commit
            with contextlib.suppress(PermissionDeniedError):
                commit.recover(loc, roll_back=False, fsync=fsync)
        return read_index_bytes(loc)

    return parse_index_or_raise(loc, shared_bytes.coordinator_bytes(comm, what, read, key=key))


def read_index_bytes(loc: storage.Location) -> bytes:
    index_loc = loc.with_path(names.index_name(loc.path))
    try:
        return storage.read_bytes(index_loc)
    except NotFoundError as exc:
        if storage.missing_bucket(exc):  # the bucket's name is wrong, not the checkpoint's
            raise
        raise NotFoundError(f"no checkpoint at {loc.url}: {index_loc.url} does not exist") from None


def parse_index_or_raise(loc: storage.Location, data: bytes | bytearray) -> Index:
    try:
        return parse_index(data)
    except (DecodeError, ValueError, IndexError) as exc:
        raise DataLossError(f"{names.index_name(loc.url)} is not a valid checkpoint index: {exc}") from exc
