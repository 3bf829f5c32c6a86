"""A fast-tier step as one checkpoint, wherever its files are: a read-only storage
backend (kind ``"served"``) over a table of the step's files, so the ordinary restore
(restore/protocol.py) and verify (_verify.py) read it as they read any checkpoint.

Each logical file (``ckpt-7.index``, ``ckpt-7.data-00002-of-00004``) maps to a
:class:`Source`: bytes in memory (a rebuilt file), or a file some rank serves (this
rank's node: read here; another node: fetched over MPI by ``_comm/serving.py``, only
the ranges asked for). Sizes come from the manifest, so a file that is not the size its
manifest says is caught before it is read.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import storage
from .._comm.serving import FileServer
from ..errors import DataLossError, PermissionDeniedError


@dataclass(frozen=True)
class Source:
    """Where one logical file's bytes are: ``rank`` serves ``name`` (its node's file),
    or ``data`` holds them."""

    size: int
    rank: int = -1
    name: str = ""
    node: str = ""
    data: bytes | None = None


class View:
    """The ``fs`` of a served Location: logical file name -> Source."""

    def __init__(self, label: str, table: dict[str, Source], server: FileServer | None):
        self.label = label
        self.table = dict(table)
        self.server = server
        self.bytes_read = 0

    def source(self, name: str) -> Source:
        try:
            return self.table[name]
        except KeyError:
            raise FileNotFoundError(f"{name} is on no node of the job") from None

    def read_into(self, name: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        src = self.source(name)
        for off, buf in ranges:
            if off < 0 or off + len(buf) > src.size:
                raise DataLossError(
                    f"{self.label}/{name}: file too short: wanted {len(buf)} bytes at offset {off}, "
                    f"it has {src.size}"
                )
        self.bytes_read += sum(len(buf) for _, buf in ranges)
        if src.data is not None:
            for off, buf in ranges:
                buf[:] = src.data[off : off + len(buf)]
            return
        assert self.server is not None
        self.server.fetch(src.rank, src.name, ranges)


class ServedBackend:
    kind = "served"

    def handles(self, fs: Any) -> bool:
        return isinstance(fs, View)

    def url(self, loc: storage.Location) -> str:
        return f"{loc.fs.label}/{loc.path}"

    def join(self, base: str, path: str) -> str:
        return posixpath.join(base, path)

    def real_dir(self, path: str) -> str:
        return path

    def plain(self, path: str) -> bool:
        return True

    def read(self, loc: storage.Location, limit: int | None) -> bytes:
        size = loc.fs.source(loc.path).size
        buf = bytearray(size if limit is None else min(limit, size))
        loc.fs.read_into(loc.path, [(0, memoryview(buf))])
        return bytes(buf)

    def read_ranges(
        self,
        loc: storage.Location,
        ranges: Sequence[tuple[int, memoryview]],
        after: Callable[[int], None] | None,
        fd: int | None,
    ) -> None:
        loc.fs.read_into(loc.path, ranges)
        if after is not None:
            for i in range(len(ranges)):
                after(i)

    def exists(self, loc: storage.Location) -> bool:
        return loc.path in loc.fs.table

    def size(self, loc: storage.Location) -> int:
        return loc.fs.source(loc.path).size

    def info(self, loc: storage.Location) -> dict:
        return {"size": self.size(loc)}

    def listing(self, loc: storage.Location) -> list[dict]:
        return []  # nothing to recover: a served step is whole or not served

    def pending_uploads(self, loc: storage.Location) -> list:
        return []

    def why_forbidden(self, loc: storage.Location, code: str) -> str:
        return code

    def _read_only(self, *_: Any) -> None:
        raise PermissionDeniedError("a served fast-tier step is read-only")

    open_writer = publish = remove = rename_all = makedirs = fsync_dir = abort_upload = _read_only


BACKEND = ServedBackend()


def location(view: View, prefix: str) -> storage.Location:
    """The Location of logical prefix ``prefix`` (``ckpt-7``) in ``view``."""
    return storage.Location(view, prefix, BACKEND)
