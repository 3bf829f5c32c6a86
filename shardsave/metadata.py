"""A checkpoint's metadata: a JSON object stored in the checkpoint itself, as a DT_STRING
scalar under the reserved name :data:`~shardsave.format.names.METADATA_NAME`.

Inside the checkpoint rather than in a file beside it, it commits atomically with the
checkpoint (never a checkpoint without its metadata or metadata without its checkpoint),
is deleted with it, and TensorFlow's readers see it as an ordinary string tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .errors import DataLossError, InvalidArgumentError
from .format.names import METADATA_NAME
from .reader import CheckpointReader

MAX_METADATA_BYTES = 1 << 20
"""The largest metadata accepted (JSON text in UTF-8): it is for steps, configs and metrics."""


def encode(metadata: Any, prefix: str) -> np.ndarray:
    """``metadata`` (a JSON-serialisable dict) as the 0-d string array saved for it."""
    if not isinstance(metadata, dict):
        raise InvalidArgumentError(f"saving {prefix}: metadata must be a dict, not {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, sort_keys=True, default=_plain)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"saving {prefix}: metadata is not JSON-serialisable: {exc}") from None
    data = text.encode("utf-8")
    if len(data) > MAX_METADATA_BYTES:
        raise InvalidArgumentError(
            f"saving {prefix}: metadata is {len(data)} bytes of JSON; at most {MAX_METADATA_BYTES}"
        )
    out = np.empty((), dtype=object)
    out[()] = data
    return out


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON numbers and lists; anything else is refused."""
    if isinstance(value, np.generic | np.ndarray) and value.dtype.kind in "biuf":
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def decode(value: Any, prefix: str) -> dict:
    """The dict stored in a checkpoint's metadata tensor (files are untrusted input)."""
    arr = np.asarray(value, dtype=object)
    if arr.shape != () or not isinstance(arr[()], bytes | str):
        raise DataLossError(
            f"{prefix}: tensor {METADATA_NAME!r} should be a string scalar of JSON, "
            f"got shape {arr.shape} of {type(arr.reshape(-1)[0]).__name__ if arr.size else 'nothing'}"
        )
    raw = arr[()]
    if len(raw) > MAX_METADATA_BYTES:
        raise DataLossError(
            f"{prefix}: tensor {METADATA_NAME!r} holds {len(raw)} bytes; a writer stores at most "
            f"{MAX_METADATA_BYTES} bytes of JSON"
        )
    try:
        # UTF-8 only, as written: json.loads(bytes) would guess UTF-16 or UTF-32 from a BOM
        out = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as exc:
        raise DataLossError(f"{prefix}: tensor {METADATA_NAME!r} is not UTF-8 JSON text: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise DataLossError(f"{prefix}: tensor {METADATA_NAME!r} is not valid JSON: {exc}") from None
    if not isinstance(out, dict):
        raise DataLossError(f"{prefix}: tensor {METADATA_NAME!r} holds {type(out).__name__}, not an object")
    return out


def read_metadata(
    prefix: str | os.PathLike, *, storage_options: dict | None = None, fs: Any = None
) -> dict | None:
    """The metadata dict saved with the checkpoint at ``prefix`` (or a directory's latest),
    or None if it was saved without. Reads only the index and that one tensor."""
    reader = CheckpointReader(prefix, storage_options=storage_options, fs=fs)
    if not reader.has_tensor(METADATA_NAME):
        return None
    size = reader.get_entries().entries[METADATA_NAME].size
    if size > MAX_METADATA_BYTES + 64:  # a few bytes of length varint and checksum besides the text
        raise DataLossError(
            f"{reader.prefix}: tensor {METADATA_NAME!r} takes {size} bytes in the data file; a writer "
            f"stores at most {MAX_METADATA_BYTES} bytes of JSON (not read)"
        )
    return decode(reader.get_tensor(METADATA_NAME), reader.prefix)
