"""Where bytes live: the only module that touches fsspec.

A :class:`Location` is a filesystem plus a path on it, resolved once from a local path or
an fsspec URL (``s3://bucket/run``, ``memory://x``, ``file:///tmp``). Local files take a
fast path through ``os`` (unbuffered writes straight from array buffers, ``os.preadv``
into preallocated buffers, fsync before publish); every other filesystem goes through
fsspec (streamed writes, ``cat_ranges`` for ranged reads, one PUT to publish).
Backend errors are translated here into shardsave's error classes.

S3 (s3fs) specifics, all decided here:

- Freshness. s3fs caches directory listings per filesystem object, and fsspec shares one
  object per set of options in a process, so a listing made once would hide the files
  other ranks or jobs wrote since. Every query of state that other processes change
  (``exists``, ``size``, ``info``, ``glob``, ``scan``) drops the cache of that path first.
- Writes. A data file goes up as one multipart upload: parts of :data:`PART_BYTES` are
  sent while the next is filled, at most :data:`UPLOAD_CONCURRENCY` in flight, so a rank
  holds at most that many parts in memory, never a copy of its whole file; a file smaller
  than one part is a single PUT. :func:`publish` is one PUT, create-only
  (``If-None-Match: *``) for the index, on stores that support it. :func:`rename_all` is
  a server-side copy per file, in parallel, then one batched delete of the sources.
- Errors. A missing bucket and access denied fail at once (:class:`NotFoundError`,
  :class:`PermissionDeniedError`, naming the URL); a missing bucket is never created.
  Transient errors (throttling, 5xx, dropped or refused connections, timeouts) are
  retried by botocore (``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` or
  ``storage_options={"config_kwargs": {"retries": {...}}}``) and, around it, by s3fs
  (5 attempts, backoff from 0.1 s); shardsave adds no retry loop of its own.
- Endpoint and credentials come from the usual AWS chain, ``AWS_ENDPOINT_URL`` included
  (botocore reads it), or from ``storage_options`` (``endpoint_url``, ``key``, ``secret``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import fnmatch
import os
import posixpath
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ShardsaveError,
    StorageError,
    UnauthenticatedError,
    UnavailableError,
)
from .format import names
from .io_threads import io_pool, wait_all

PART_BYTES = 8 << 20
"""Size of one part of an S3 multipart upload (S3 needs at least 5 MiB but for the last)."""
UPLOAD_CONCURRENCY = 8
"""Parts of one file in flight at once; memory per writing rank is about this times
:data:`PART_BYTES`."""
WRITE_CHUNK = 8 << 20
"""Other fsspec filesystems get writes of at most this many bytes at a time, so their
write buffers never hold a copy of a whole large array."""
_MIN_PART = 5 << 20
_MAX_PARTS = 10_000


@dataclass(frozen=True)
class Location:
    """A path on one filesystem. ``path`` has no protocol; ``url`` is for messages."""

    fs: Any
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_s3(self) -> bool:
        return _is_s3(self.fs)

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


def _is_s3(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols and hasattr(fs, "_call_s3")


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
    except (ImportError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"cannot open {text!r}: {exc}") from exc
    return Location(fs, path)


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``AccessDenied``, ``403``...) of an error as
    s3fs translated it (the botocore error is in its chain), or None."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def missing_bucket(exc: BaseException) -> bool:
    """Whether an S3 error (as s3fs translated it) says the bucket does not exist."""
    return _s3_code(exc) == "NoSuchBucket"


def _bucket_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


_S3_DENIALS = {
    "InvalidAccessKeyId": "the access key ID is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key ID",
    "AccessDenied": "the credentials are valid but not allowed to do this (bucket or IAM policy)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
}
"""S3 error codes that say why a request was refused: the first two and the tokens mean
the credentials themselves are wrong (:class:`UnauthenticatedError`)."""
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError"}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}  # as TensorFlow's errno mapping
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _why_forbidden(location: Location | str, exc: BaseException) -> str | None:
    """The S3 code of a refusal. A HEAD request's 403 has no body to say why, so ask
    again with a GET of one byte, whose answer says it (only ever on this error path)."""
    code = _s3_code(exc)
    if code not in ("403", "Forbidden") or not isinstance(location, Location) or not location.is_s3:
        return code
    bucket, key, _ = location.fs.split_path(location.path)
    try:
        if key:
            location.fs.call_s3("get_object", Bucket=bucket, Key=key, Range="bytes=0-0")
        else:
            location.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except Exception as again:  # noqa: BLE001 - only its code is wanted
        return _s3_code(again) or code
    return code


def _denied(location: Location | str, url: str, action: str, exc: BaseException) -> PermissionDeniedError:
    if exc.errno in _DENIED_ERRNOS and not _s3_code(exc):  # a local file (or any OS call)
        return PermissionDeniedError(f"{action} {url}: {_os_reason(exc)}", exc.errno, exc.strerror, url)
    code = _why_forbidden(location, exc)
    reason = _S3_DENIALS.get(code or "")
    cls = UnauthenticatedError if code in _S3_DENIALS and code != "AccessDenied" else PermissionDeniedError
    detail = f"{reason} (S3 {code})" if reason else str(exc)
    return cls(f"{action} {url}: permission denied: {detail}", errno.EACCES, "Permission denied", url)


def _os_reason(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the system's words and the errno's name."""
    name = errno.errorcode.get(exc.errno or -1)
    words = exc.strerror or str(exc)
    return f"{words} ({name})" if name else words


def _storage_error(url: str, action: str, exc: OSError) -> StorageError:
    """The shardsave error for an operating-system error of ``action`` on ``url``,
    keeping its errno: permissions and read-only filesystems, full disks, the rest."""
    cls = StorageError
    if exc.errno in _DENIED_ERRNOS:
        cls = PermissionDeniedError
    elif exc.errno in _FULL_ERRNOS:
        cls = ResourceExhaustedError
    return cls(f"{action} {url}: {_os_reason(exc)}", exc.errno, exc.strerror, url)


@contextlib.contextmanager
def translate_errors(location: Location | str, action: str) -> Iterator[None]:
    """Turn backend exceptions into shardsave errors that name the URL."""
    url = location.url if isinstance(location, Location) else location
    try:
        yield
    except ShardsaveError:
        raise
    except FileNotFoundError as exc:
        if missing_bucket(exc):
            raise NotFoundError(f"{action} {url}: bucket {_bucket_of(url)!r} does not exist") from exc
        raise NotFoundError(f"{action} {url}: not found ({exc})") from exc
    except PermissionError as exc:
        raise _denied(location, url, action, exc) from exc
    except Exception as exc:
        # botocore's EndpointConnectionError and friends: the store cannot be reached
        # (wrong endpoint, network down) after the client's own retries
        if type(exc).__name__ in _UNREACHABLE or isinstance(exc, ConnectionError):
            raise UnavailableError(f"{action} {url}: storage unreachable: {exc}") from exc
        if type(exc).__name__ in _NO_CREDENTIALS:
            raise UnauthenticatedError(
                f"{action} {url}: no S3 credentials found ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass storage_options key and secret",
                errno.EACCES, "Permission denied", url,
            ) from exc
        if isinstance(exc, OSError):  # ENOSPC, EROFS, EIO, EISDIR...: name the file, keep errno
            raise _storage_error(url, action, exc) from exc
        raise


_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError"}


def _fresh(loc: Location) -> None:
    """Forget cached listings of ``loc`` and its parents: other processes write here."""
    if not loc.is_local:
        loc.fs.invalidate_cache(loc.path)


def exists(loc: Location) -> bool:
    with translate_errors(loc, "checking"):
        if loc.is_local:
            return os.path.exists(loc.path)
        _fresh(loc)
        return loc.fs.exists(loc.path)


def size(loc: Location) -> int | None:
    """Size in bytes, or None if the file does not exist."""
    with translate_errors(loc, "checking"):
        try:
            if loc.is_local:
                return os.stat(loc.path).st_size
            _fresh(loc)
            return int(loc.fs.size(loc.path))
        except FileNotFoundError as exc:
            if missing_bucket(exc):
                raise
            return None


def makedirs(loc: Location) -> None:
    """Create a directory; on S3 (no directories) check that the bucket exists instead.

    s3fs's own ``makedirs`` would create a missing bucket: a typo in a bucket name must
    fail, not make a new bucket.
    """
    with translate_errors(loc, "creating directory"):
        if loc.is_local:
            try:
                os.makedirs(loc.path, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise InvalidArgumentError(
                    f"cannot create directory {loc.path}: {_file_in_the_way(loc.path)} is a "
                    "file, not a directory"
                ) from None
        elif loc.is_s3:
            bucket = loc.path.split("/", 1)[0]
            try:
                loc.fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise NotFoundError(f"writing to {loc.url}: bucket {bucket!r} does not exist") from None
        else:
            loc.fs.makedirs(loc.path, exist_ok=True)


def _file_in_the_way(path: str) -> str:
    """The deepest existing one of ``path`` and its ancestors (a file, when makedirs failed)."""
    here = os.path.normpath(path)
    while not os.path.exists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    return here


def read_bytes(loc: Location, missing_ok: bool = False, limit: int | None = None) -> bytes | None:
    """The whole file, or its first ``limit`` bytes; None if it does not exist and
    ``missing_ok`` (a missing S3 bucket still raises :class:`NotFoundError`)."""
    with translate_errors(loc, "reading"):
        try:
            if loc.is_local:
                with open(loc.path, "rb") as f:
                    return f.read() if limit is None else f.read(limit)
            if limit is None:
                return loc.fs.cat_file(loc.path)
            return _read_head(loc, limit)
        except FileNotFoundError as exc:
            if missing_ok and not missing_bucket(exc):
                return None
            raise
        except OSError as exc:
            if loc.is_local and exc.errno == errno.EIO:  # the disk cannot give back stored bytes
                raise DataLossError(f"{loc.url}: reading failed: {_os_reason(exc)}") from exc
            raise


def _read_head(loc: Location, limit: int) -> bytes:
    """The first ``limit`` bytes of a file on an fsspec filesystem: one ranged GET on S3."""
    try:
        return loc.fs.cat_file(loc.path, start=0, end=limit)
    except OSError as exc:  # S3 answers a range of an empty object with 416 InvalidRange
        if exc.errno != errno.EINVAL:
            raise
    with loc.fs.open(loc.path, "rb") as f:
        return f.read(limit)


class Writer:
    """Streams one data file: ``write`` buffers straight through, ``close`` makes it durable.

    Local files: unbuffered ``write`` from the caller's buffer, fsync on close. S3: a
    multipart upload with concurrent parts (:class:`_MultipartUpload`). Other fsspec
    filesystems: their own buffered file, fed at most :data:`WRITE_CHUNK` at a time.
    ``abort`` leaves no object behind on S3 (the upload is aborted, not completed).
    """

    def __init__(self, loc: Location, fsync: bool = True):
        self.loc = loc
        self.fsync = fsync
        self.written = 0
        self.etag: str | None = None  # S3: the finished object's ETag (what the commit compares)
        self._writeback: _EarlyWriteback | None = None
        with translate_errors(loc, "creating"):
            if loc.is_local:
                # Unlink rather than truncate an old file: readers of the old one keep it,
                # and ext4 flushes a truncated-then-rewritten file on close (auto_da_alloc).
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(loc.path)
                self._file = open(loc.path, "wb", buffering=0)  # noqa: SIM115
            elif loc.is_s3:
                self._file = _MultipartUpload(loc)
            else:
                self._file = loc.fs.open(loc.path, "wb")

    def write(self, buffer) -> None:
        view = memoryview(buffer).cast("B")
        with translate_errors(self.loc, "writing"):
            if self.loc.is_local:
                while view:
                    n = self._file.write(view)
                    n = len(view) if n is None else n
                    self.written += n
                    view = view[n:]
                if self.fsync and self._writeback is None and self.written >= EARLY_WRITEBACK_BYTES:
                    self._writeback = _EarlyWriteback(self._file.fileno())
            elif self.loc.is_s3:
                self._file.write(view)
                self.written += len(view)
            else:
                for start in range(0, len(view), WRITE_CHUNK):
                    self._file.write(view[start : start + WRITE_CHUNK])
                self.written += len(view)

    def close(self) -> None:
        with translate_errors(self.loc, "closing"):
            if self._writeback is not None:
                writeback, self._writeback = self._writeback, None
                writeback.stop()  # raises what the kernel reported to it, once
            if self.loc.is_local and self.fsync:
                os.fsync(self._file.fileno())
            closed = self._file.close()
            if self.loc.is_s3:
                self.etag = closed

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writeback is not None:
                writeback, self._writeback = self._writeback, None
                with contextlib.suppress(OSError):
                    writeback.stop()
            if self.loc.is_s3:
                self._file.abort()
            else:
                self._file.close()


EARLY_WRITEBACK_BYTES = 16 << 20
"""A durable local data file starts going to disk once this much of it is written."""


class _EarlyWriteback:
    """Keeps the disk writing a data file while the file is still being written.

    Without it a durable save's fsync starts after the last write, with the whole file
    dirty in the page cache, and the disk idles while the writes fill it. A thread
    calling ``fdatasync`` in a loop starts the writeback early, as PostgreSQL's
    ``*_flush_after`` and RocksDB's ``bytes_per_sync`` do with ``sync_file_range`` (which
    Python does not expose): 1 GiB written and fsynced took 1.76 s instead of 2.02 s
    here. Durability still comes from the final fsync. An error is kept for ``stop``: the
    kernel reports a writeback error once per open file, so that fsync would not see it.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._stop = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="shardsave-writeback", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                os.fdatasync(self._fd)
                self._stop.wait(0.01)
        except OSError as exc:
            self._error = exc

    def stop(self) -> None:
        """Join the thread; raise the error it met, if any."""
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error


class _MultipartUpload:
    """One S3 object written as a stream of parts, several in flight at once.

    Parts are sent on s3fs's event loop (its retries and error translation included)
    while the caller fills the next one; part ``n`` is ``PART_BYTES * (1 + n // 1000)``
    bytes, so 10,000 parts reach far beyond any one rank's file. Nothing is visible until
    ``close`` completes the upload.
    """

    def __init__(self, loc: Location):
        self.fs = loc.fs
        self.path = loc.path
        self.bucket, self.key, _ = loc.fs.split_path(loc.path)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.inflight: collections.deque = collections.deque()
        self.parts: list[dict] = []

    def _part_size(self) -> int:
        started = len(self.parts) + len(self.inflight)
        return max(PART_BYTES, _MIN_PART) * (1 + started // 1000)

    def write(self, view: memoryview) -> None:
        while view:
            room = self._part_size() - len(self.buffer)
            self.buffer += view[:room]
            view = view[room:]
            if len(self.buffer) >= self._part_size():
                self._send()

    def _send(self) -> None:
        if self.upload_id is None:
            out = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self.upload_id = out["UploadId"]
        number = len(self.parts) + len(self.inflight) + 1
        if number > _MAX_PARTS:
            raise InvalidArgumentError(f"s3://{self.path}: more than {_MAX_PARTS} parts")
        body, self.buffer = self.buffer, bytearray()
        coro = self.fs._call_s3(
            "upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
            PartNumber=number, Body=body,
        )
        self.inflight.append((number, asyncio.run_coroutine_threadsafe(coro, self.fs.loop)))
        while len(self.inflight) >= max(1, UPLOAD_CONCURRENCY):
            self._finish_one()

    def _finish_one(self) -> None:
        number, future = self.inflight.popleft()
        self.parts.append({"PartNumber": number, "ETag": future.result()["ETag"]})

    def close(self) -> str | None:
        """Finish the object; return its ETag."""
        if self.upload_id is None:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._send()
            while self.inflight:
                self._finish_one()
            out = self.fs.call_s3(
                "complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                UploadId=self.upload_id, MultipartUpload={"Parts": self.parts},
            )
        self.buffer = bytearray()
        self.fs.invalidate_cache(self.path)
        return _etag(out)

    def abort(self) -> None:
        futures = [f for _, f in self.inflight]
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures, timeout=60)
        self.inflight.clear()
        self.buffer = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)


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
            return
        # s3fs: one PUT up to S3's 5 GiB limit, not a multipart upload
        extra = {"chunksize": 5 << 30} if loc.is_s3 else {}
        try:
            if exclusive:
                try:
                    loc.fs.pipe_file(loc.path, data, mode="create", **extra)
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
            loc.fs.pipe_file(loc.path, data, **extra)
        finally:
            _fresh(loc)


def fsync_dir(loc: Location) -> None:
    if not loc.is_local:
        return
    with translate_errors(loc, "syncing directory"):
        fd = os.open(loc.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:  # some filesystems refuse fsync on directories
            if exc.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)


def remove(locs: Sequence[Location]) -> None:
    """Delete files; missing ones are fine. On S3 one request deletes up to 1000."""
    s3: dict[int, list[Location]] = {}
    for loc in locs:
        if loc.is_s3:
            s3.setdefault(id(loc.fs), []).append(loc)
            continue
        with translate_errors(loc, "deleting"), contextlib.suppress(FileNotFoundError):
            if loc.is_local:
                os.unlink(loc.path)
            else:
                loc.fs.rm_file(loc.path)
    for group in s3.values():
        _delete_objects(group)


def _delete_objects(locs: list[Location]) -> None:
    """S3 DeleteObjects, 1000 keys a request (``fs.rm`` would glob names with ``[*?``)."""
    fs = locs[0].fs
    by_bucket: dict[str, list[Location]] = {}
    for loc in locs:
        by_bucket.setdefault(fs.split_path(loc.path)[0], []).append(loc)
    for bucket, group in by_bucket.items():
        for i in range(0, len(group), 1000):
            chunk = group[i : i + 1000]
            keys = [{"Key": fs.split_path(loc.path)[1]} for loc in chunk]
            with translate_errors(chunk[0], "deleting"):
                out = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            for loc in chunk:
                fs.invalidate_cache(loc.path)
            for err in out.get("Errors", []):
                url = f"s3://{bucket}/{err.get('Key')}"
                if err.get("Code") == "AccessDenied":
                    raise PermissionDeniedError(f"deleting {url}: permission denied ({err.get('Message')})",
                                                errno.EACCES, "Permission denied", url)
                if err.get("Code") != "NoSuchKey":
                    raise StorageError(f"deleting {url}: {err.get('Code')}: {err.get('Message')}",
                                       errno.EIO, err.get("Message"), url)


def _listing(loc: Location) -> list[dict]:
    """``[{"name", "size", "mtime"}]`` of the files directly in directory ``loc``, fresh;
    [] if it does not exist (but a missing S3 bucket raises)."""
    with translate_errors(loc, "listing"):
        if loc.is_local:
            try:
                with os.scandir(loc.path) as it:
                    out = []
                    for entry in it:
                        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                            if entry.is_file():
                                st = entry.stat()
                                out.append({"name": entry.name, "size": st.st_size, "mtime": st.st_mtime, "etag": None,
                                            "version": (st.st_ino, st.st_mtime_ns, st.st_size)})
                    return out
            except (FileNotFoundError, NotADirectoryError):
                return []
        _fresh(loc)
        try:
            entries = loc.fs.ls(loc.path, detail=True)
        except FileNotFoundError as exc:
            if missing_bucket(exc):
                raise
            return []
        return [
            _entry(posixpath.basename(d["name"].rstrip("/")), int(d.get("size") or 0), _mtime(d), _etag(d))
            for d in entries
            if d.get("type", "file") == "file"
        ]


def _entry(name: str, size: int, mtime: float | None, etag: str | None) -> dict:
    return {"name": name, "size": size, "mtime": mtime, "etag": etag, "version": (etag, mtime, size)}


def _etag(d: dict) -> str | None:
    etag = d.get("ETag") or d.get("etag")
    return etag.strip('"') if isinstance(etag, str) else None


def files_in(loc: Location) -> dict[str, dict]:
    """``{name: {"name", "size", "mtime", "etag", "version"}}`` of the files directly in
    directory ``loc``, from one fresh listing. ``etag`` is S3's (None elsewhere);
    ``version`` changes whenever the file is replaced (inode, mtime and size locally)."""
    return {d["name"]: d for d in _listing(loc)}


def rename(src: Location, dst: Location) -> bool:
    """Move ``src`` to ``dst``, replacing it; False if ``src`` was missing (see :func:`rename_all`)."""
    return not rename_all([(src, dst)])


RENAME_CONCURRENCY = 16
"""Server-side copies in flight at once when S3 files are renamed."""


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
    missing = []
    if pairs[0][0].is_local:
        for src, dst in pairs:
            with translate_errors(src, "renaming"):
                try:
                    os.replace(src.path, dst.path)
                except FileNotFoundError:
                    missing.append(src)
        return missing

    def copy(pair: tuple[Location, Location]) -> bool:
        src, dst = pair
        _fresh(src)
        with translate_errors(src, "renaming"):
            try:
                src.fs.cp_file(src.path, dst.path)  # a single file: no globbing of the name
            except FileNotFoundError as exc:
                if missing_bucket(exc):
                    raise
                return False
        _fresh(dst)
        return True

    with concurrent.futures.ThreadPoolExecutor(min(RENAME_CONCURRENCY, len(pairs))) as pool:
        copied = list(pool.map(copy, pairs))
    remove([src for (src, _), done in zip(pairs, copied, strict=True) if done])
    return [src for (src, _), done in zip(pairs, copied, strict=True) if not done]


def _mtime(d: dict) -> float | None:
    mtime = d.get("LastModified") or d.get("mtime") or d.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return mtime


def glob(loc: Location, pattern: str) -> list[Location]:
    """Files in the directory ``loc`` whose names match ``pattern`` (fnmatch). The pattern
    is a fixed one: a checkpoint's name is never part of it (see :func:`data_files`)."""
    if loc.is_local:
        with translate_errors(loc, "listing"):
            try:
                names = os.listdir(loc.path)
            except FileNotFoundError:
                return []
    else:
        names = [d["name"] for d in _listing(loc)]
    return [loc.child(n) for n in sorted(names) if fnmatch.fnmatchcase(n, pattern)]


def scan(loc: Location, pattern: str = "*") -> list[tuple[Location, dict]]:
    """Like :func:`glob`, with each file's ``{"size", "mtime"}``, from one listing."""
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


def _where(loc: Location) -> tuple[str, str]:
    """``(directory, name)`` of a file: locally the directory as the kernel resolves it
    (symlinks and ``..`` included, so ``D/link/../x`` is where ``link`` points), else as
    written."""
    parent, name = posixpath.split(loc.path.rstrip("/"))
    return (os.path.realpath(parent or "/") if loc.is_local else parent), name


def _same_fs(a: Location, b: Location) -> bool:
    return a.fs is b.fs or a.fs == b.fs


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
    if not loc.is_local and any(part in (".", "..") for part in loc.path.split("/")):
        return False
    parent, name = _where(loc)
    if name in ("", ".", ".."):
        return False
    return parent == (os.path.realpath(directory.path) if directory.is_local else directory.path.rstrip("/"))


def info(loc: Location) -> dict:
    """``{"size": int, "mtime": float or None}`` of a file."""
    with translate_errors(loc, "checking"):
        if loc.is_local:
            st = os.stat(loc.path)
            return {"size": st.st_size, "mtime": st.st_mtime}
        _fresh(loc)
        d = loc.fs.info(loc.path)
        return {"size": int(d.get("size") or 0), "mtime": _mtime(d)}


def pending_uploads(loc: Location) -> list[tuple[Location, str, float | None]]:
    """Unfinished S3 multipart uploads of files directly in directory ``loc``:
    ``(location, upload id, start time)``. Their parts are invisible but stored (and
    billed) until aborted. [] on other filesystems."""
    if not loc.is_s3:
        return []
    bucket, key, _ = loc.fs.split_path(loc.path)
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    with translate_errors(loc, "listing uploads in"):
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = loc.fs.call_s3("list_multipart_uploads", **kwargs)
            for u in page.get("Uploads", []):
                name = u["Key"][len(prefix):]
                if name and "/" not in name:
                    started = u.get("Initiated")
                    out.append((loc.child(name), u["UploadId"], started.timestamp() if started else None))
            if not page.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
    return sorted(out, key=lambda t: t[0].path)


def abort_upload(loc: Location, upload_id: str) -> None:
    """Abort one unfinished multipart upload (from :func:`pending_uploads`)."""
    bucket, key, _ = loc.fs.split_path(loc.path)
    with translate_errors(loc, "aborting upload of"), contextlib.suppress(FileNotFoundError):
        loc.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def open_local(loc: Location) -> int:
    """A file descriptor for reading a local file (the caller closes it).

    Holding it keeps reading the same file even if the path is replaced meanwhile.
    """
    with translate_errors(loc, "reading"):
        return os.open(loc.path, os.O_RDONLY)


def close_local(fd: int) -> None:
    os.close(fd)


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
    """
    if not ranges:
        return
    with translate_errors(loc, "reading"):
        if fd is not None:
            _pread_all(fd, ranges, loc, after)
        elif loc.is_local:
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
                wait_all([io_pool().submit(after, i) for i in range(len(ranges))])


def _short_read(loc: Location, offset: int, want: int, got: int) -> ShardsaveError:
    return DataLossError(
        f"{loc.url}: file too short: wanted {want} bytes at offset {offset}, got {got}"
    )


def _pread_all(fd: int, ranges: Sequence[tuple[int, memoryview]], loc: Location, after) -> None:
    def one(i: int) -> None:
        offset, buf = ranges[i]
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:  # EIO and the like: the device could not give the bytes
                raise DataLossError(
                    f"{loc.url}: reading {len(view)} bytes at offset {offset} failed: {exc}"
                ) from exc
            if n == 0:
                raise _short_read(loc, offset, len(view), done)
            done += n
        if after is not None:
            after(i)

    if len(ranges) == 1:
        one(0)
        return
    wait_all([io_pool().submit(one, i) for i in range(len(ranges))])
