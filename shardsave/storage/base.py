"""What a backend is, and the one place backend errors become shardsave errors.

A :class:`Location` is a path on one filesystem together with the :class:`Backend` that
serves it, chosen once by ``resolve()``. A backend answers a dozen primitives (write a
stream, publish, read, read ranges, size, list, remove, rename, make directories, sync a
directory, pending uploads) and the path rules of its store; the module-level functions
of ``shardsave.storage`` add nothing but :func:`translate_errors` around them.
"""

from __future__ import annotations

import contextlib
import errno
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import (
    DataLossError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ShardsaveError,
    StorageError,
    UnauthenticatedError,
    UnavailableError,
)


class FileWriter(Protocol):
    """One file being streamed by a backend (see ``storage.Writer``)."""

    written: int

    def write(self, view: memoryview) -> None: ...

    def close(self) -> str | None:
        """Make the file whole (and durable if asked); return its ETag where the store has one."""

    def abort(self) -> None: ...


class Backend(Protocol):
    """The primitives of one kind of storage. Raise the backend's own exceptions
    (``FileNotFoundError``, ``PermissionError``, botocore's...): the callers translate them."""

    kind: str
    """``"local"``, ``"s3"`` or another name: for messages and the few decisions callers
    outside storage make (``Location.is_local``, ``Location.is_s3``)."""

    def handles(self, fs: Any) -> bool:
        """Whether this backend serves the fsspec filesystem ``fs``."""

    # paths
    def url(self, loc: Location) -> str: ...
    def join(self, base: str, path: str) -> str: ...
    def real_dir(self, path: str) -> str:
        """A directory as the store resolves it (locally, symlinks and ``..``)."""

    def plain(self, path: str) -> bool:
        """Whether ``path`` has no segment the store would not take literally."""

    # bytes
    def open_writer(self, loc: Location, fsync: bool, size_hint: int | None = None) -> FileWriter:
        """A stream to ``loc``; ``size_hint``: the bytes expected, if known (S3 sizes its
        parts by it; a wrong one costs requests, not correctness)."""

    def publish(self, loc: Location, data: bytes, fsync: bool, exclusive: bool) -> None: ...
    def read(self, loc: Location, limit: int | None) -> bytes: ...
    def read_ranges(
        self,
        loc: Location,
        ranges: Sequence[tuple[int, memoryview]],
        after: Callable[[int], None] | None,
        fd: int | None,
    ) -> None: ...

    # metadata, fresh: other processes change it
    def exists(self, loc: Location) -> bool: ...
    def size(self, loc: Location) -> int: ...
    def info(self, loc: Location) -> dict: ...
    def listing(self, loc: Location) -> list[dict]:
        """Entries (``name size mtime etag version``) of the files directly in ``loc``; []
        if it does not exist."""

    # changes
    def remove(self, locs: Sequence[Location]) -> None: ...
    def rename_all(self, pairs: Sequence[tuple[Location, Location]]) -> list[Location]: ...
    def makedirs(self, loc: Location) -> None: ...
    def fsync_dir(self, loc: Location) -> None: ...
    def pending_uploads(self, loc: Location) -> list[tuple[Location, str, float | None]]: ...
    def abort_upload(self, loc: Location, upload_id: str) -> None: ...

    # errors
    def why_forbidden(self, loc: Location, code: str) -> str:
        """The S3-style code that says why a bare 403 ``code`` was given, or ``code``."""


@dataclass(frozen=True)
class Location:
    """A path on one filesystem. ``path`` has no protocol; ``url`` is for messages."""

    fs: Any
    path: str
    backend: Backend = field(repr=False, compare=False)  # follows from fs

    @property
    def is_local(self) -> bool:
        return self.backend.kind == "local"

    @property
    def is_s3(self) -> bool:
        return self.backend.kind == "s3"

    @property
    def url(self) -> str:
        return self.backend.url(self)

    def child(self, path: str) -> Location:
        """The location of ``path``, which is relative to this one or absolute on its fs."""
        return Location(self.fs, self.backend.join(self.path, path), self.backend)

    def with_path(self, path: str) -> Location:
        return Location(self.fs, path, self.backend)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")) or "/", self.backend)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))


# ------------------------------------------------------------------ error translation
def s3_code(exc: BaseException) -> str | None:
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
    return s3_code(exc) == "NoSuchBucket"


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
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
}


def _why_forbidden(location: Location | str, exc: BaseException) -> str | None:
    """The S3 code of a refusal; a bare 403 is explained by the backend, which may ask again."""
    code = s3_code(exc)
    if code not in ("403", "Forbidden") or not isinstance(location, Location):
        return code
    return location.backend.why_forbidden(location, code)


def _denied(location: Location | str, url: str, action: str, exc: BaseException) -> PermissionDeniedError:
    if exc.errno in _DENIED_ERRNOS and not s3_code(exc):  # a local file (or any OS call)
        return PermissionDeniedError(f"{action} {url}: {os_reason(exc)}", exc.errno, exc.strerror, url)
    code = _why_forbidden(location, exc)
    reason = _S3_DENIALS.get(code or "")
    cls = UnauthenticatedError if code in _S3_DENIALS and code != "AccessDenied" else PermissionDeniedError
    detail = f"{reason} (S3 {code})" if reason else str(exc)
    return cls(f"{action} {url}: permission denied: {detail}", errno.EACCES, "Permission denied", url)


def os_reason(exc: OSError) -> str:
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
    return cls(f"{action} {url}: {os_reason(exc)}", exc.errno, exc.strerror, url)


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
                errno.EACCES,
                "Permission denied",
                url,
            ) from exc
        if isinstance(exc, OSError):  # ENOSPC, EROFS, EIO, EISDIR...: name the file, keep errno
            raise _storage_error(url, action, exc) from exc
        raise


def short_read(loc: Location, offset: int, want: int, got: int) -> ShardsaveError:
    return DataLossError(f"{loc.url}: file too short: wanted {want} bytes at offset {offset}, got {got}")
