"""Any other fsspec filesystem (``memory://``, ``gs://``...), through fsspec's own calls.

Streamed writes through the filesystem's buffered file, ``cat_ranges`` for ranged reads,
one ``pipe_file`` to publish (create-only where the filesystem supports ``mode="create"``),
``cp_file`` then delete to rename. fsspec may cache listings per filesystem object, and
one object is shared per set of options in a process: every query of state that other
processes change drops the cache of that path first (:meth:`FsspecBackend.fresh`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import FailedPreconditionError, InvalidArgumentError
from .base import Location, missing_bucket, short_read, translate_errors
from .threads import io_pool, wait_all

WRITE_CHUNK = 8 << 20
"""Writes of at most this many bytes at a time, so the filesystem's write buffer never
holds a copy of a whole large array."""
RENAME_CONCURRENCY = 16
"""Server-side copies in flight at once when files are renamed."""


class FsspecBackend:
    kind = "fsspec"

    def __reduce__(self) -> str:
        return "BACKEND"  # one per module: a pickled Location comes back with the same one

    def handles(self, fs: Any) -> bool:
        return True  # the fallback: any filesystem fsspec gives

    # ------------------------------------------------------------------ paths
    def url(self, loc: Location) -> str:
        protocol = loc.fs.protocol if isinstance(loc.fs.protocol, str) else loc.fs.protocol[0]
        return f"{protocol}://{loc.path}"

    def join(self, base: str, path: str) -> str:
        return posixpath.join(base, path)

    def real_dir(self, path: str) -> str:
        return path

    def plain(self, path: str) -> bool:
        return not any(part in (".", "..") for part in path.split("/"))  # "..": a key segment

    def fresh(self, loc: Location) -> None:
        """Forget cached listings of ``loc`` and its parents: other processes write here."""
        loc.fs.invalidate_cache(loc.path)

    # ------------------------------------------------------------------ bytes
    def open_writer(self, loc: Location, fsync: bool, size_hint: int | None = None) -> Any:
        return _FsspecFile(loc.fs.open(loc.path, "wb"))

    publish_options: dict = {}
    """Extra keywords of ``pipe_file`` when publishing."""

    def publish(self, loc: Location, data: bytes, fsync: bool, exclusive: bool) -> None:
        try:
            if exclusive:
                try:
                    loc.fs.pipe_file(loc.path, data, mode="create", **self.publish_options)
                    return
                except FileExistsError:
                    raise FailedPreconditionError(
                        f"publishing {loc.url}: it appeared while this save was running; is "
                        "another job saving to the same prefix?"
                    ) from None
                except (NotImplementedError, TypeError):
                    pass  # a filesystem without create-only writes
                except OSError as exc:  # a store that rejects If-None-Match (501)
                    if exc.errno != errno.ENOSYS:
                        raise
            loc.fs.pipe_file(loc.path, data, **self.publish_options)
        finally:
            self.fresh(loc)

    def read(self, loc: Location, limit: int | None) -> bytes:
        if limit is None:
            return loc.fs.cat_file(loc.path)
        try:  # one ranged GET on S3
            return loc.fs.cat_file(loc.path, start=0, end=limit)
        except OSError as exc:  # S3 answers a range of an empty object with 416 InvalidRange
            if exc.errno != errno.EINVAL:
                raise
        with loc.fs.open(loc.path, "rb") as f:
            return f.read(limit)

    def read_ranges(
        self,
        loc: Location,
        ranges: Sequence[tuple[int, memoryview]],
        after: Callable[[int], None] | None,
        fd: int | None,
    ) -> None:
        if fd is not None:
            raise InvalidArgumentError(f"{loc.url}: an open file descriptor is for local files only")
        offsets = [off for off, _ in ranges]
        ends = [off + len(buf) for off, buf in ranges]
        blobs = loc.fs.cat_ranges([loc.path] * len(ranges), offsets, ends)
        for (off, buf), blob in zip(ranges, blobs, strict=True):
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != len(buf):
                raise short_read(loc, off, len(buf), len(blob))
            buf[:] = blob
        if after is not None:
            wait_all([io_pool().submit(after, i) for i in range(len(ranges))])

    # ------------------------------------------------------------------ metadata
    def exists(self, loc: Location) -> bool:
        self.fresh(loc)
        return loc.fs.exists(loc.path)

    def size(self, loc: Location) -> int:
        self.fresh(loc)
        return int(loc.fs.size(loc.path))

    def info(self, loc: Location) -> dict:
        self.fresh(loc)
        d = loc.fs.info(loc.path)
        return {"size": int(d.get("size") or 0), "mtime": _mtime(d)}

    def listing(self, loc: Location) -> list[dict]:
        self.fresh(loc)
        try:
            entries = loc.fs.ls(loc.path, detail=True)
        except FileNotFoundError as exc:
            if missing_bucket(exc):
                raise
            return []
        return [
            entry(posixpath.basename(d["name"].rstrip("/")), int(d.get("size") or 0), _mtime(d), etag_of(d))
            for d in entries
            if d.get("type", "file") == "file"
        ]

    # ------------------------------------------------------------------ changes
    def remove(self, locs: Sequence[Location]) -> None:
        for loc in locs:
            with translate_errors(loc, "deleting"), contextlib.suppress(FileNotFoundError):
                loc.fs.rm_file(loc.path)

    def rename_all(self, pairs: Sequence[tuple[Location, Location]]) -> list[Location]:
        """A server-side copy per file, in parallel, then one delete of the sources."""

        def copy(pair: tuple[Location, Location]) -> bool:
            src, dst = pair
            self.fresh(src)
            with translate_errors(src, "renaming"):
                try:
                    src.fs.cp_file(src.path, dst.path)  # a single file: no globbing of the name
                except FileNotFoundError as exc:
                    if missing_bucket(exc):
                        raise
                    return False
            self.fresh(dst)
            return True

        with concurrent.futures.ThreadPoolExecutor(min(RENAME_CONCURRENCY, len(pairs))) as pool:
            copied = list(pool.map(copy, pairs))
        self.remove([src for (src, _), done in zip(pairs, copied, strict=True) if done])
        return [src for (src, _), done in zip(pairs, copied, strict=True) if not done]

    def makedirs(self, loc: Location) -> None:
        loc.fs.makedirs(loc.path, exist_ok=True)

    def fsync_dir(self, loc: Location) -> None:
        pass  # what the store accepted is durable

    def pending_uploads(self, loc: Location) -> list[tuple[Location, str, float | None]]:
        return []

    def abort_upload(self, loc: Location, upload_id: str) -> None:
        pass

    def why_forbidden(self, loc: Location, code: str) -> str:
        return code


BACKEND = FsspecBackend()


class _FsspecFile:
    """The filesystem's own buffered file, fed at most :data:`WRITE_CHUNK` at a time."""

    def __init__(self, file: Any):
        self._file = file
        self.written = 0

    def write(self, view: memoryview) -> None:
        for start in range(0, len(view), WRITE_CHUNK):
            self._file.write(view[start : start + WRITE_CHUNK])
        self.written += len(view)

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def entry(name: str, size: int, mtime: float | None, etag: str | None) -> dict:
    return {"name": name, "size": size, "mtime": mtime, "etag": etag, "version": (etag, mtime, size)}


def etag_of(d: dict) -> str | None:
    etag = d.get("ETag") or d.get("etag")
    return etag.strip('"') if isinstance(etag, str) else None


def _mtime(d: dict) -> float | None:
    mtime = d.get("LastModified") or d.get("mtime") or d.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return mtime
