"""Where bytes live: the only module that touches fsspec.

A :class:`Location` is a filesystem plus a path on it, resolved once from a local path or
an fsspec URL (``s3://bucket/run``, ``memory://x``, ``file:///tmp``). Local files take a
fast path through ``os`` (unbuffered writes straight from array buffers, ``os.preadv``
into preallocated buffers, fsync before publish); every other filesystem goes through
fsspec (streamed writes, ``cat_ranges`` for ranged reads, one PUT to publish).
Backend errors are translated here into shardsave's error classes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, ShardsaveError

READ_THREADS = 8


@dataclass(frozen=True)
class Location:
    """A path on one filesystem. ``path`` has no protocol; ``url`` is for messages."""

    fs: Any
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def url(self) -> str:
        if self.is_local:
            return self.path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.path}"

    def child(self, path: str) -> Location:
        """The location of ``path``, which is relative to this one or absolute on its fs."""
        joined = path if path.startswith("/") and self.is_local else posixpath.join(self.path, path)
        return Location(self.fs, posixpath.normpath(joined) if self.is_local else joined)

    def with_path(self, path: str) -> Location:
        return Location(self.fs, path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")) or "/")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))


def resolve(
    url_or_path: str | os.PathLike,
    storage_options: dict | None = None,
    fs: Any = None,
) -> Location:
    """Turn a user's path or URL into a :class:`Location`."""
    text = os.fspath(url_or_path)
    if not text:
        raise InvalidArgumentError("empty checkpoint path")
    if fs is not None:
        if storage_options:
            raise InvalidArgumentError("pass either fs or storage_options, not both")
        return Location(fs, fs._strip_protocol(text))
    try:
        fs, path = fsspec.core.url_to_fs(text, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot open {text!r}: {exc}") from exc
    return Location(fs, path)


@contextlib.contextmanager
def translate_errors(location: Location | str, action: str) -> Iterator[None]:
    """Turn backend exceptions into shardsave errors that name the URL."""
    url = location.url if isinstance(location, Location) else location
    try:
        yield
    except ShardsaveError:
        raise
    except FileNotFoundError as exc:
        raise NotFoundError(f"{action} {url}: not found ({exc})") from exc
    except PermissionError as exc:
        raise PermissionDeniedError(f"{action} {url}: permission denied ({exc})") from exc


def exists(loc: Location) -> bool:
    with translate_errors(loc, "checking"):
        if loc.is_local:
            return os.path.exists(loc.path)
        return loc.fs.exists(loc.path)


def size(loc: Location) -> int | None:
    """Size in bytes, or None if the file does not exist."""
    with translate_errors(loc, "checking"):
        try:
            if loc.is_local:
                return os.stat(loc.path).st_size
            return int(loc.fs.size(loc.path))
        except FileNotFoundError:
            return None


def makedirs(loc: Location) -> None:
    with translate_errors(loc, "creating directory"):
        if loc.is_local:
            os.makedirs(loc.path, exist_ok=True)
        else:
            loc.fs.makedirs(loc.path, exist_ok=True)


def read_bytes(loc: Location) -> bytes:
    with translate_errors(loc, "reading"):
        if loc.is_local:
            with open(loc.path, "rb") as f:
                return f.read()
        return loc.fs.cat_file(loc.path)


class Writer:
    """Streams one data file: ``write`` buffers straight through, ``close`` makes it durable."""

    def __init__(self, loc: Location, fsync: bool = True):
        self.loc = loc
        self.fsync = fsync
        self.written = 0
        with translate_errors(loc, "creating"):
            if loc.is_local:
                # Unlink rather than truncate an old file: readers of the old one keep it,
                # and ext4 flushes a truncated-then-rewritten file on close (auto_da_alloc).
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(loc.path)
                self._file = open(loc.path, "wb", buffering=0)  # noqa: SIM115
            else:
                self._file = loc.fs.open(loc.path, "wb")

    def write(self, buffer) -> None:
        view = memoryview(buffer).cast("B")
        with translate_errors(self.loc, "writing"):
            while view:
                n = self._file.write(view)
                n = len(view) if n is None else n
                self.written += n
                view = view[n:]

    def close(self) -> None:
        with translate_errors(self.loc, "closing"):
            if self.loc.is_local and self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()


def publish(loc: Location, data: bytes, fsync: bool = True) -> None:
    """Make ``data`` appear at ``loc`` all at once (the commit point of a checkpoint)."""
    with translate_errors(loc, "publishing"):
        if loc.is_local:
            tmp = f"{loc.path}.tmp{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, loc.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if fsync:
                fsync_dir(loc.parent)
        else:
            loc.fs.pipe_file(loc.path, data)


def fsync_dir(loc: Location) -> None:
    if not loc.is_local:
        return
    fd = os.open(loc.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove(locs: Sequence[Location]) -> None:
    """Delete files; missing ones are fine."""
    for loc in locs:
        with translate_errors(loc, "deleting"), contextlib.suppress(FileNotFoundError):
            if loc.is_local:
                os.unlink(loc.path)
            else:
                loc.fs.rm_file(loc.path)


def glob(loc: Location, pattern: str) -> list[Location]:
    """Files in the directory ``loc`` whose names match ``pattern`` (fnmatch)."""
    import fnmatch

    with translate_errors(loc, "listing"):
        if loc.is_local:
            try:
                names = os.listdir(loc.path)
            except FileNotFoundError:
                return []
        else:
            try:
                names = [posixpath.basename(p.rstrip("/")) for p in loc.fs.ls(loc.path, detail=False)]
            except FileNotFoundError:
                return []
    return [loc.child(n) for n in sorted(names) if fnmatch.fnmatchcase(n, pattern)]


def info(loc: Location) -> dict:
    """``{"size": int, "mtime": float or None}`` of a file."""
    with translate_errors(loc, "checking"):
        if loc.is_local:
            st = os.stat(loc.path)
            return {"size": st.st_size, "mtime": st.st_mtime}
        d = loc.fs.info(loc.path)
        mtime = d.get("LastModified") or d.get("mtime") or d.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return {"size": int(d.get("size") or 0), "mtime": mtime}


def read_ranges(
    loc: Location,
    ranges: Sequence[tuple[int, memoryview]],
    after: Callable[[int], None] | None = None,
) -> None:
    """Fill each ``(offset, buffer)`` with the file's bytes at ``offset``, in parallel.

    ``after(i)``, if given, runs as soon as range ``i`` is filled (in an I/O thread for
    local files), so checking the bytes overlaps with reading the next ones.
    """
    if not ranges:
        return
    with translate_errors(loc, "reading"):
        if loc.is_local:
            fd = os.open(loc.path, os.O_RDONLY)
            try:
                _pread_all(fd, ranges, loc, after)
            finally:
                os.close(fd)
        else:
            offsets = [off for off, _ in ranges]
            ends = [off + len(buf) for off, buf in ranges]
            blobs = loc.fs.cat_ranges([loc.path] * len(ranges), offsets, ends)
            for (off, buf), blob in zip(ranges, blobs, strict=True):
                if isinstance(blob, Exception):
                    raise blob
                if len(blob) != len(buf):
                    raise _short_read(loc, off, len(buf), len(blob))
                buf[:] = blob
            if after is not None:
                for fut in [io_pool().submit(after, i) for i in range(len(ranges))]:
                    fut.result()


def _short_read(loc: Location, offset: int, want: int, got: int) -> ShardsaveError:
    from .errors import DataLossError

    return DataLossError(
        f"{loc.url}: file too short: wanted {want} bytes at offset {offset}, got {got}"
    )


def _pread_all(fd: int, ranges: Sequence[tuple[int, memoryview]], loc: Location, after) -> None:
    def one(i: int) -> None:
        offset, buf = ranges[i]
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise _short_read(loc, offset, len(view), done)
            done += n
        if after is not None:
            after(i)

    if len(ranges) == 1:
        one(0)
        return
    for fut in [io_pool().submit(one, i) for i in range(len(ranges))]:
        fut.result()


_pool: ThreadPoolExecutor | None = None


def io_pool() -> ThreadPoolExecutor:
    """Threads shared by all reads (file I/O and CRC32C release the GIL)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shardsave-io")
    return _pool
