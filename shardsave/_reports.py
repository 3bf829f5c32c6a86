"""How one rank's error reaches the others: a plain tuple each way.

A rank describes its exception as ``(class name, message, errno, file)``, which pickles
without the exception's own state; the coordinator combines the failures into one such
tuple and every rank rebuilds the same :mod:`shardsave.errors` class from it.
"""

from __future__ import annotations

import os
from typing import Any

from . import errors


def describe(error: BaseException) -> tuple[str, str, int | None, str | None]:
    """What a rank tells the others about its error: class name, message, and for a
    :class:`~shardsave.errors.StorageError` its errno and file (else None)."""
    storage = isinstance(error, errors.StorageError)
    return (
        type(error).__name__,
        str(error) or repr(error),
        error.errno if storage else None,
        error.filename if storage else None,
    )


def rebuild(report: tuple) -> errors.ShardsaveError:
    """The error a verdict names: its class from shardsave.errors (else AbortedError),
    with the errno and file of a storage error, so every rank raises the same."""
    kind, message, *rest = report
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ShardsaveError)):
        cls = errors.AbortedError
    if not issubclass(cls, errors.StorageError):
        return cls(message)
    code, filename = (*rest, None, None)[:2]
    return cls(message, code, os.strerror(code) if code is not None else None, filename)


def combined_error(failed: list[tuple[int, tuple]], what: str) -> errors.ShardsaveError:
    """One error for all ranks: the failures' own class if they agree on one (the closest
    common :class:`~shardsave.errors.StorageError` class if they are all storage errors,
    with the errno and file they agree on), else :class:`~shardsave.errors.AbortedError`.

    ``failed`` holds ``(rank, report)`` with each report from :func:`describe`."""
    cls = _common_class({report[0] for _, report in failed})
    ranks = ", ".join(str(rank) for rank, _ in failed)
    reasons = "; ".join(f"rank {rank}: {report[0]}: {report[1]}" for rank, report in failed)
    message = f"{what} failed on rank(s) {ranks}: {reasons}"
    if not issubclass(cls, errors.StorageError):
        return cls(message)
    code = _agreed(report[2] if len(report) > 2 else None for _, report in failed)
    filename = _agreed(report[3] if len(report) > 3 else None for _, report in failed)
    return cls(message, code, os.strerror(code) if code is not None else None, filename)


def _common_class(kinds: set[str]) -> type[errors.ShardsaveError]:
    classes = [getattr(errors, kind, None) for kind in kinds]
    if not all(isinstance(c, type) and issubclass(c, errors.ShardsaveError) for c in classes):
        return errors.AbortedError
    if len(classes) == 1:
        return classes[0]
    if all(issubclass(c, errors.StorageError) for c in classes):
        return next(c for c in classes[0].__mro__ if all(issubclass(o, c) for o in classes))
    return errors.AbortedError


def _agreed(values) -> Any:
    """The value if every one is the same, else None."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None
