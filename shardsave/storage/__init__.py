"""Where bytes live: the only package that touches fsspec.

A :class:`Location` is a filesystem plus a path on it plus the backend that serves it,
resolved once from a local path or an fsspec URL (``s3://bucket/run``, ``memory://x``,
``file:///tmp``). The functions here are what the rest of shardsave calls; each asks the
location's backend and translates its errors (:func:`base.translate_errors`) into
shardsave's error classes, naming the URL.

Backends: :mod:`.local` (``os``-level: unbuffered writes, ``os.preadv``, early
writeback, fsync before publish), :mod:`.s3` (multipart uploads sized by the file's
expected size or the ``upload_part_size`` and ``upload_concurrency`` storage options,
create-only PUT, DeleteObjects, S3 error codes, pending uploads) and :mod:`.fsspec`
(any other fsspec filesystem). Adding a backend is one new module implementing :class:`base.Backend` plus
one entry in :data:`_BACKENDS` (which ``resolve()`` asks, in order).

Freshness: fsspec caches directory listings per filesystem object and shares one object
per set of options in a process, so a listing made once would hide the files other
ranks or jobs wrote since. Every query of state that other processes change
(``exists``, ``size``, ``info``, ``files_in``, ``scan``) drops the cache of that path first.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

from fsspec.core import url_to_fs

from ..errors import InvalidArgumentError
from ..format import names
from . import fsspec as generic
from . import local, s3
from .base import Backend, Location, missing_bucket, translate_errors

__all__ = [
    "Location",
    "Writer",
    "abort_upload",
    "close_local",
    "map_local",
    "data_files",
    "exists",
    "files_in",
    "fsync_dir",
    "info",
    "is_directly_in",
    "makedirs",
    "missing_bucket",
    "open_local",
    "pending_uploads",
    "publish",
    "read_bytes",
    "read_ranges",
    "remove",
    "rename",
    "rename_all",
    "resolve",
    "same_path",
    "scan",
    "size",
]

_BACKENDS: tuple[Backend, ...] = (local.BACKEND, s3.BACKEND, generic.BACKEND)
"""Asked in order: the first that handles a filesystem serves it (the last takes any)."""


def _backend(fs: Any) -> Backend:
    return next(b for b in _BACKENDS if b.handles(fs))


def resolve(
    url_or_path: str | os.PathLike,
    storage_options: dict | None = None,
    fs: Any = None,
) -> Location:
    """Turn a user's path or URL into a :class:`Location`.

    ``storage_options`` go to fsspec (``url_to_fs``), but for shardsave's own keys
    (:data:`s3.OPTIONS`: ``upload_part_size``, ``upload_concurrency``), which are checked
    and taken out first, and given to the S3 backend (other filesystems ignore them). Those
    alone may also come with a ready ``fs``.
    """
    text = os.fspath(url_or_path)
    if not text:
        raise InvalidArgumentError("empty checkpoint path")
    options = dict(storage_options or {})
    own = s3.upload_options({k: options.pop(k) for k in s3.OPTIONS if k in options})
    if fs is not None:
        if options:
            raise InvalidArgumentError("pass either fs or storage_options, not both")
        path = fs._strip_protocol(text)
    else:
        try:
            fs, path = url_to_fs(text, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"cannot open {text!r}: {exc}") from exc
    backend = _backend(fs)
    if own and isinstance(backend, s3.S3Backend):
        backend = backend.with_options(own)
    return Location(fs, path, backend)


# ------------------------------------------------------------------ metadata
def exists(loc: Location) -> bool:
    with translate_errors(loc, "checking"):
        return loc.backend.exists(loc)


def size(loc: Location) -> int | None:
    """Size in bytes, or None if the file does not exist."""
    with translate_errors(loc, "checking"):
        try:
            return loc.backend.size(loc)
        except FileNotFoundError as exc:
            if missing_bucket(exc):
                raise
            return None


def info(loc: Location) -> dict:
    """``{"size": int, "mtime": float or None}`` of a file."""
    with translate_errors(loc, "checking"):
        return loc.backend.info(loc)


def makedirs(loc: Location) -> None:
    """Create a directory; on S3 (no directories) check that the bucket exists instead."""
    with translate_errors(loc, "creating directory"):
        loc.backend.makedirs(loc)


def fsync_dir(loc: Location) -> None:
    """Make a directory's entries durable (local files; elsewhere nothing to do)."""
    with translate_errors(loc, "syncing directory"):
        loc.backend.fsync_dir(loc)


# ------------------------------------------------------------------ bytes
def read_bytes(loc: Location, missing_ok: bool = False, limit: int | None = None) -> bytes | None:
    """The whole file, or its first ``limit`` bytes; None if it does not exist and
    ``missing_ok`` (a missing S3 bucket still raises :class:`NotFoundError`)."""
    with translate_errors(loc, "reading"):
        try:
            return loc.backend.read(loc, limit)
        except FileNotFoundError as exc:
            if missing_ok and not missing_bucket(exc):
                return None
            raise


class Writer:
    """Streams one data file: ``write`` buffers straight through, ``close`` makes it durable.

    Local files: unbuffered ``write`` from the caller's buffer, fsync on close. S3: a
    multipart upload with concurrent parts, sized from ``size_hint``, the bytes expected if
    known (``s3.base_part_size``; a wrong hint costs requests, not correctness; other
    backends ignore it), or the ``upload_part_size`` option. Other fsspec filesystems: their
    own buffered file, fed a bounded chunk at a time. ``abort`` leaves no object behind on
    S3 (the upload is aborted, not completed); a local file stays as far as it was written.
    """

    def __init__(self, loc: Location, fsync: bool = True, size_hint: int | None = None):
        self.loc = loc
        self.fsync = fsync
        self.etag: str | None = None  # S3: the finished object's ETag (what the commit compares)
        with translate_errors(loc, "creating"):
            self._file = loc.backend.open_writer(loc, fsync, size_hint)

    @property
    def written(self) -> int:
        return self._file.written

    def write(self, buffer) -> None:
        view = memoryview(buffer).cast("B")
        with translate_errors(self.loc, "writing"):
            self._file.write(view)

    def close(self) -> None:
        with translate_errors(self.loc, "closing"):
            self.etag = self._file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the error that made us abort is the one to report
            self._file.abort()


def publish(loc: Location, data: bytes, fsync: bool = True, *, exclusive: bool = False) -> None:
    """Make ``data`` appear at ``loc`` all at once (the commit point of a checkpoint).

    Locally: a temp file, fsync, ``os.replace``, fsync of the directory. Elsewhere: one
    PUT. ``exclusive`` makes that PUT create-only (``If-None-Match: *`` on S3) where the
    store supports it, so a file that appeared meanwhile (another job saving to the same
    prefix) is never overwritten: :class:`FailedPreconditionError`. Locally the replace
    always overwrites (a local save publishes only its journal, under a name of its own,
    and renames that over the index: commit.py).
    """
    with translate_errors(loc, "publishing"):
        loc.backend.publish(loc, data, fsync, exclusive)


def open_local(loc: Location) -> int:
    """A file descriptor for reading a local file (the caller closes it).

    Holding it keeps reading the same file even if the path is replaced meanwhile.
    """
    with translate_errors(loc, "reading"):
        return local.open_fd(loc)


def read_local_run(loc: Location, fd: int, offset: int, buffers: Sequence[memoryview]) -> None:
    """Fill byte ``buffers``, one after the other, with the bytes of local file ``loc`` (open
    as ``fd``, from ``open_local``) from ``offset``, in one vectored read. A file shorter
    than that is :class:`DataLossError`."""
    local.preadv_exact(fd, offset, buffers, loc)  # an OSError is already DataLossError there


def close_local(fd: int) -> None:
    local.close_fd(fd)


def map_local(loc: Location, size: int, *, create: bool = False):
    """A local file mapped into memory (``storage/local.map_file``): read-only and checked
    to be ``size`` bytes, or ``create``-d at that size to be filled in place. None when
    ``size`` is 0. The caller closes it."""
    if not loc.is_local:
        raise InvalidArgumentError(f"{loc.url}: only a local file can be mapped")
    with translate_errors(loc, "mapping"):
        return local.map_file(loc, size, create)


def read_ranges(
    loc: Location,
    ranges: Sequence[tuple[int, memoryview]],
    after: Callable[[int], None] | None = None,
    fd: int | None = None,
) -> None:
    """Fill each ``(offset, buffer)`` with the file's bytes at ``offset``, in parallel.

    ``after(i)``, if given, runs as soon as range ``i`` is filled (in an I/O thread for
    local files), so checking the bytes overlaps with reading the next ones. ``fd``: an
    open local file (from ``open_local``) to read instead of opening ``loc`` again.
    A file shorter than a range is :class:`DataLossError`.
    """
    if not ranges:
        return
    with translate_errors(loc, "reading"):
        loc.backend.read_ranges(loc, ranges, after, fd)


# ------------------------------------------------------------------ changes
def remove(locs: Sequence[Location]) -> None:
    """Delete files; missing ones are fine. On S3 one request deletes up to 1000."""
    by_backend: dict[int, tuple[Backend, list[Location]]] = {}
    for loc in locs:
        by_backend.setdefault(id(loc.backend), (loc.backend, []))[1].append(loc)
    for backend, group in by_backend.values():
        backend.remove(group)


def rename(src: Location, dst: Location) -> bool:
    """Move ``src`` to ``dst``, replacing it; False if ``src`` was missing (see :func:`rename_all`)."""
    return not rename_all([(src, dst)])


def rename_all(pairs: Sequence[tuple[Location, Location]]) -> list[Location]:
    """Move each ``src`` to its ``dst``, replacing what is there; a missing ``src`` is
    skipped (someone else moved it already: renames here are idempotent), and returned.

    Locally ``os.replace`` (atomic; readers holding the old file keep it). Elsewhere a
    server-side copy, in parallel, then one delete of the sources: an S3 object is
    replaced at once, so ``dst`` is always a whole file, old or new. No durability here:
    the caller fsyncs the directory.
    """
    if not pairs:
        return []
    return pairs[0][0].backend.rename_all(pairs)


def pending_uploads(loc: Location) -> list[tuple[Location, str, float | None]]:
    """Unfinished S3 multipart uploads of files directly in directory ``loc``:
    ``(location, upload id, start time)``. Their parts are invisible but stored (and
    billed) until aborted. [] on other filesystems."""
    with translate_errors(loc, "listing uploads in"):
        return loc.backend.pending_uploads(loc)


def abort_upload(loc: Location, upload_id: str) -> None:
    """Abort one unfinished multipart upload (from :func:`pending_uploads`)."""
    with translate_errors(loc, "aborting upload of"), contextlib.suppress(FileNotFoundError):
        loc.backend.abort_upload(loc, upload_id)


# ------------------------------------------------------------------ listings
def _listing(loc: Location) -> list[dict]:
    """``[{"name", "size", "mtime", "etag", "version"}]`` of the files directly in
    directory ``loc``, fresh; [] if it does not exist (but a missing S3 bucket raises)."""
    with translate_errors(loc, "listing"):
        return loc.backend.listing(loc)


def files_in(loc: Location) -> dict[str, dict]:
    """``{name: {"name", "size", "mtime", "etag", "version"}}`` of the files directly in
    directory ``loc``, from one fresh listing. ``etag`` is S3's (None elsewhere);
    ``version`` changes whenever the file is replaced (inode, mtime and size locally)."""
    return {d["name"]: d for d in _listing(loc)}


def scan(loc: Location, pattern: str = "*") -> list[tuple[Location, dict]]:
    """The files in the directory ``loc`` whose names match ``pattern`` (fnmatch, a fixed
    pattern: a checkpoint's name is never part of it, see :func:`data_files`), sorted,
    each with its ``{"size", "mtime"}``, from one fresh listing."""
    return [
        (loc.child(d["name"]), {"size": d["size"], "mtime": d["mtime"]})
        for d in sorted(_listing(loc), key=lambda d: d["name"])
        if fnmatch.fnmatchcase(d["name"], pattern)
    ]


def data_files(directory: Location, prefix: str) -> list[tuple[Location, dict]]:
    """The data files of the checkpoint named ``prefix`` (a file name, taken literally)
    in ``directory``, each with its ``{"size", "mtime"}``: one listing of the directory,
    names matched exactly (:func:`names.is_data_file_of`), never as a glob."""
    return [(f, i) for f, i in scan(directory) if names.is_data_file_of(f.name, prefix)]


# ------------------------------------------------------------------ paths
def _where(loc: Location) -> tuple[str, str]:
    """``(directory, name)`` of a file: locally the directory as the kernel resolves it
    (symlinks and ``..`` included, so ``D/link/../x`` is where ``link`` points), else as
    written."""
    parent, name = posixpath.split(loc.path.rstrip("/"))
    return loc.backend.real_dir(parent), name


def _same_fs(a: Location, b: Location) -> bool:
    # fsspec caches a synchronous filesystem (local) per thread and its instances compare by
    # a token that includes the thread: a non-blocking save's thread has its own
    if a.fs is b.fs or a.fs == b.fs:
        return True
    return type(a.fs) is type(b.fs) and getattr(a.fs, "storage_options", None) == getattr(
        b.fs, "storage_options", ()
    )


def same_path(a: Location, b: Location) -> bool:
    """Whether ``a`` and ``b`` name the same file (``D/./x`` and ``D/x`` locally)."""
    return _same_fs(a, b) and _where(a) == _where(b)


def is_directly_in(loc: Location, directory: Location) -> bool:
    """Whether ``loc`` names a file directly inside ``directory`` (same filesystem).

    Locally the directories are compared as the kernel resolves them, so neither
    ``D/../victim/x`` nor ``D/link/../x`` is in ``D``; on object stores, where ``..`` is
    an ordinary key segment, a path with a ``.`` or ``..`` segment is never inside.
    """
    if not _same_fs(loc, directory):
        return False
    if not loc.backend.plain(loc.path):
        return False
    parent, name = _where(loc)
    if name in ("", ".", ".."):
        return False
    return parent == directory.backend.real_dir(directory.path.rstrip("/"))
