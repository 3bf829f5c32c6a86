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


class PermissionDeniedError(ShardsaveError, PermissionError):
    """Storage refused access (credentials, bucket policy)."""


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
    "ShardsaveError",
    "UnavailableError",
]
