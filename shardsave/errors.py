"""The exceptions shardsave raises.

One root class, :class:`ShardsaveError`; each subclass also inherits the built-in
exception that means the same thing, so ``except KeyError`` still catches a missing
variable. Names follow TensorFlow's ``tf.errors`` where the meaning is the same.
"""

from __future__ import annotations


class ShardsaveError(Exception):
    """Base class of every error shardsave raises on purpose."""


class NotFoundError(ShardsaveError, KeyError):
    """A checkpoint, file or variable that was asked for does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(ShardsaveError, ValueError):
    """Input that cannot be used: a shape or dtype mismatch, a bad slice, bad options."""


class DataLossError(ShardsaveError, OSError):
    """Stored bytes are damaged: a checksum mismatch, a truncated or garbage file."""


class FailedPreconditionError(ShardsaveError, RuntimeError):
    """The call needs a state that is not there, e.g. reading an uninitialized variable."""


class AbortedError(ShardsaveError, RuntimeError):
    """A collective call failed on another rank, so this rank gave up too."""


class DeadlineExceededError(ShardsaveError, TimeoutError):
    """A collective step waited ``timeout`` seconds for ranks that did not arrive."""


class StorageError(ShardsaveError, OSError):
    """The filesystem or object store failed an operation: no space, read-only, an I/O
    error on write, a directory where a file was expected...

    ``errno``, ``strerror`` and ``filename`` are the operating system's (``errno.ENOSPC``,
    "No space left on device", the path or URL); ``errno`` is None where the store gave
    none. A restore that cannot read stored bytes raises :class:`DataLossError` instead.
    """

    def __init__(
        self, message: str, errno: int | None = None, strerror: str | None = None, filename: str | None = None
    ):
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __str__(self) -> str:  # OSError would print "[Errno n] strerror: filename"
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        return type(self), (str(self), self.errno, self.strerror, self.filename)


class PermissionDeniedError(StorageError, PermissionError):
    """Storage refused access: file permissions (EACCES, EPERM), a read-only filesystem
    (EROFS, as TensorFlow maps it), S3 credentials or policy."""


class UnauthenticatedError(PermissionDeniedError):
    """The store does not accept the credentials themselves: none found, an unknown
    access key, a wrong secret, an expired token (S3 says which in the message)."""


class ResourceExhaustedError(StorageError):
    """Storage is full: no space left on the device (ENOSPC) or a quota reached (EDQUOT)."""


class UnavailableError(ShardsaveError, ConnectionError):
    """Storage could not be reached (wrong endpoint, network down), even after retries."""


__all__ = [
    "AbortedError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ShardsaveError",
    "StorageError",
    "UnauthenticatedError",
    "UnavailableError",
]
