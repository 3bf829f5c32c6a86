"""S3 through s3fs: what differs from any other fsspec filesystem is decided here.

- Writes. A data file goes up as one multipart upload: parts are sent while the next is
  filled, at most ``upload_concurrency`` in flight, so a rank holds about that many parts
  in memory, never a copy of its whole file; a file smaller than one part is a single PUT.
  The part size follows from the file's expected size (:func:`base_part_size`): 8 MiB up
  to 512 MiB files, then 1/64 of the file up to 128 MiB parts (1/1000 past 125 GiB), so
  a large file costs a few requests per GiB (S3 takes about 3,500 writes a second per
  prefix), and S3's 10,000-part limit holds even when the size is unknown or wrong
  (:func:`part_bytes`). ``publish`` is one PUT (never a multipart upload), create-only
  (``If-None-Match: *``) for the index, on stores that support it. A rename is a
  server-side copy per file, in parallel, then one batched delete of the sources
  (DeleteObjects, 1000 keys a request).
- Options. ``storage_options`` may hold two of shardsave's own, taken out before the rest
  go to s3fs (:data:`OPTIONS`; other filesystems ignore them): ``upload_part_size`` (bytes,
  5 MiB to 5 GiB) fixes the part size instead of the rule (raised only where a file's
  expected size would need more than 1,000 parts), and ``upload_concurrency`` (at least 1,
  default 8) the parts of one file in flight. Past 10 in flight, also raise botocore's
  connection pool: ``config_kwargs={"max_pool_connections": n}``. s3fs's own
  ``max_concurrency`` is left to s3fs (its whole-object reads and writes).
- Errors. A missing bucket and access denied fail at once (``NotFoundError``,
  ``PermissionDeniedError``, naming the URL); a missing bucket is never created. A HEAD's
  bare 403 is explained by asking again with a GET of one byte. Transient errors
  (throttling, 5xx, dropped or refused connections, timeouts) are retried by botocore
  (``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` or ``storage_options={"config_kwargs":
  {"retries": {...}}}``) and, around it, by s3fs (5 attempts, backoff from 0.1 s);
  shardsave adds no retry loop of its own.
- Unfinished multipart uploads are listed and aborted here (``shardsave gc``).
- Endpoint and credentials come from the usual AWS chain, ``AWS_ENDPOINT_URL`` included
  (botocore reads it), or from ``storage_options`` (``endpoint_url``, ``key``, ``secret``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import operator
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, StorageError
from .base import Location, s3_code, translate_errors
from .fsspec import FsspecBackend, etag_of

MiB = 1 << 20
PART_BYTES = 8 * MiB
"""The smallest part the size rule picks, and the part size of a file of unknown size."""
UPLOAD_CONCURRENCY = 8
"""Parts of one file in flight at once (``upload_concurrency``); memory per writing rank is
about this times the part size."""
TARGET_PARTS = 64
"""Parts the size rule aims at for a file of known size: enough to keep 8 in flight for
most of the upload."""
AUTO_MAX_PART = 128 * MiB
"""The largest part the rule picks unless S3's part limit needs more: 8 in flight hold 1 GiB."""
MIN_PART = 5 * MiB
"""S3's smallest part (but for the last)."""
MAX_PART = 5 << 30
"""S3's largest part."""
MAX_PARTS = 10_000
"""S3's most parts in one upload."""
GROWTH_PARTS = 1000
"""Parts of one size: past this many, parts double in size every this many parts (the
expected size always fits in this many)."""
OPTIONS = ("upload_concurrency", "upload_part_size")
"""shardsave's own ``storage_options`` keys for S3 (taken out before fsspec sees the rest)."""
_DELETE_BATCH = 1000


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def base_part_size(size_hint: int | None, part_size: int | None = None) -> int:
    """The size of the first parts of an upload of ``size_hint`` bytes (None: not known).

    The rule: ``size_hint / TARGET_PARTS`` rounded up to whole MiB, at least
    :data:`PART_BYTES` (8 MiB) and at most :data:`AUTO_MAX_PART` (128 MiB); or
    ``part_size`` (the ``upload_part_size`` option), if given. Either is then raised, if
    need be, so that the expected size fits in :data:`GROWTH_PARTS` parts, and kept within
    S3's 5 MiB to 5 GiB a part. So files up to 512 MiB have 8 MiB parts, a 1 GiB file 16
    MiB parts (64 requests), files from 8 GiB to 125 GiB 128 MiB parts (8 requests a GiB),
    larger ones 1/1000 of the file; at most 1 GiB is in flight (8 parts) up to 125 GiB.

    Based on: S3's limits (docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html: parts
    of 5 MiB to 5 GiB, at most 10,000 of them) and request rates (3,500 PUT/COPY/POST/
    DELETE a second per prefix: userguide/optimizing-performance.html); AWS's advice to
    fetch ranges of 8 or 16 MB, aligned to the parts (whitepaper "Best Practices Design
    Patterns: Optimizing Amazon S3 Performance", "Use Byte-Range Fetches"); boto3's
    ``TransferConfig`` (``multipart_chunksize`` 8 MiB, ``max_concurrency`` 10: memory is
    parts times concurrency); and s3fs's ``calculate_chunksize`` (50 MiB parts, raised to
    ``size / 10000`` for the limit), here with room left for a wrong expected size.
    """
    if part_size is None:
        base = PART_BYTES
        if size_hint:
            base = min(max(_ceil_div(size_hint, TARGET_PARTS), PART_BYTES), AUTO_MAX_PART)
    else:
        base = part_size
    if size_hint:
        base = max(base, _ceil_div(size_hint, GROWTH_PARTS))
    if part_size is None or base != part_size:
        base = _ceil_div(base, MiB) * MiB
    return min(max(base, MIN_PART), MAX_PART)


def part_bytes(number: int, base: int) -> int:
    """The size of part ``number`` (from 1) of an upload whose first parts are ``base``
    bytes: twice as large every :data:`GROWTH_PARTS` parts, at most :data:`MAX_PART`.

    The expected size fits in the first :data:`GROWTH_PARTS` parts; the growth is the
    fallback for a file larger than expected (or of unknown size): parts stay about 1/1000
    of what was written, and 10,000 parts from ``base`` hold ``1,023,000 * base`` bytes, 8
    TiB from 8 MiB: more than S3's largest object (5 TiB) for any base of 5.2 MiB or more.
    """
    return min(MAX_PART, base << ((number - 1) // GROWTH_PARTS))


def upload_options(options: dict) -> dict:
    """Check shardsave's S3 ``storage_options`` (:data:`OPTIONS`): ``{name: int}``."""
    out = {}
    for name, value in options.items():
        low, high, what = (
            (MIN_PART, MAX_PART, "bytes from 5 MiB (5242880) to 5 GiB (5368709120)")
            if name == "upload_part_size"
            else (1, None, "parts, at least 1")
        )
        try:
            n = operator.index(value) if not isinstance(value, bool) else None
        except TypeError:
            n = None
        if n is None or n < low or (high is not None and n > high):
            raise InvalidArgumentError(
                f"storage option {name}={value!r}: must be an integer number of {what}"
            )
        out[name] = n
    return out


class S3Backend(FsspecBackend):
    """S3; ``part_size`` and ``concurrency`` are the ``upload_part_size`` and
    ``upload_concurrency`` options (None: :func:`base_part_size`'s rule,
    :data:`UPLOAD_CONCURRENCY`). ``resolve()`` gives a Location a backend of its options."""

    kind = "s3"
    publish_options = {"chunksize": 5 << 30}  # one PUT up to S3's 5 GiB limit

    def __init__(self, part_size: int | None = None, concurrency: int | None = None):
        self.part_size = part_size
        self.concurrency = concurrency

    def __reduce__(self) -> Any:
        if self.part_size is None and self.concurrency is None:
            return "BACKEND"
        return (S3Backend, (self.part_size, self.concurrency))

    def with_options(self, options: dict) -> S3Backend:
        """This backend with the ``upload_*`` options (checked by :func:`upload_options`)."""
        if not options:
            return self
        return S3Backend(options.get("upload_part_size"), options.get("upload_concurrency"))

    def handles(self, fs: Any) -> bool:
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        return "s3" in protocols and hasattr(fs, "_call_s3")

    def open_writer(self, loc: Location, fsync: bool, size_hint: int | None = None) -> _MultipartUpload:
        base = base_part_size(size_hint, self.part_size)
        return _MultipartUpload(loc, base, self.concurrency or UPLOAD_CONCURRENCY)

    def makedirs(self, loc: Location) -> None:
        """No directories on S3: check that the bucket exists instead (s3fs's own
        ``makedirs`` would create a missing bucket: a typo must fail, not make one)."""
        bucket = loc.path.split("/", 1)[0]
        try:
            loc.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise NotFoundError(f"writing to {loc.url}: bucket {bucket!r} does not exist") from None

    def remove(self, locs: Sequence[Location]) -> None:
        """DeleteObjects, 1000 keys a request (``fs.rm`` would glob names with ``[*?``)."""
        by_fs: dict[int, list[Location]] = {}
        for loc in locs:
            by_fs.setdefault(id(loc.fs), []).append(loc)
        for group in by_fs.values():
            _delete_objects(group)

    def pending_uploads(self, loc: Location) -> list[tuple[Location, str, float | None]]:
        bucket, key, _ = loc.fs.split_path(loc.path)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = loc.fs.call_s3("list_multipart_uploads", **kwargs)
            for u in page.get("Uploads", []):
                name = u["Key"][len(prefix) :]
                if name and "/" not in name:
                    started = u.get("Initiated")
                    out.append((loc.child(name), u["UploadId"], started.timestamp() if started else None))
            if not page.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
        return sorted(out, key=lambda t: t[0].path)

    def abort_upload(self, loc: Location, upload_id: str) -> None:
        bucket, key, _ = loc.fs.split_path(loc.path)
        loc.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def why_forbidden(self, loc: Location, code: str) -> str:
        """A HEAD request's 403 has no body to say why, so ask again with a GET of one
        byte, whose answer says it (only ever on this error path)."""
        bucket, key, _ = loc.fs.split_path(loc.path)
        try:
            if key:
                loc.fs.call_s3("get_object", Bucket=bucket, Key=key, Range="bytes=0-0")
            else:
                loc.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except Exception as again:  # noqa: BLE001 - only its code is wanted
            return s3_code(again) or code
        return code


BACKEND = S3Backend()


def _delete_objects(locs: list[Location]) -> None:
    fs = locs[0].fs
    by_bucket: dict[str, list[Location]] = {}
    for loc in locs:
        by_bucket.setdefault(fs.split_path(loc.path)[0], []).append(loc)
    for bucket, group in by_bucket.items():
        for i in range(0, len(group), _DELETE_BATCH):
            chunk = group[i : i + _DELETE_BATCH]
            keys = [{"Key": fs.split_path(loc.path)[1]} for loc in chunk]
            with translate_errors(chunk[0], "deleting"):
                out = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            for loc in chunk:
                fs.invalidate_cache(loc.path)
            for err in out.get("Errors", []):
                url = f"s3://{bucket}/{err.get('Key')}"
                if err.get("Code") == "AccessDenied":
                    raise PermissionDeniedError(
                        f"deleting {url}: permission denied ({err.get('Message')})",
                        errno.EACCES,
                        "Permission denied",
                        url,
                    )
                if err.get("Code") != "NoSuchKey":
                    raise StorageError(
                        f"deleting {url}: {err.get('Code')}: {err.get('Message')}",
                        errno.EIO,
                        err.get("Message"),
                        url,
                    )


class _MultipartUpload:
    """One S3 object written as a stream of parts, several in flight at once.

    Parts are sent on s3fs's event loop (its retries and error translation included)
    while the caller fills the next one; part ``n`` is :func:`part_bytes` ``(n, base)``
    bytes: ``base`` for the first 1000 (which hold the expected size), then growing, so
    10,000 parts reach far beyond any one rank's file. Nothing is visible until ``close``
    completes the upload; ``abort`` leaves no object and no parts behind.
    """

    def __init__(self, loc: Location, base: int, concurrency: int):
        self.fs = loc.fs
        self.path = loc.path
        self.bucket, self.key, _ = loc.fs.split_path(loc.path)
        self.base = base
        self.concurrency = max(1, concurrency)
        self.written = 0
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.inflight: collections.deque = collections.deque()
        self.parts: list[dict] = []

    def _part_size(self) -> int:
        return part_bytes(len(self.parts) + len(self.inflight) + 1, self.base)

    def write(self, view: memoryview) -> None:
        total = len(view)
        while view:
            room = self._part_size() - len(self.buffer)
            self.buffer += view[:room]
            view = view[room:]
            if len(self.buffer) >= self._part_size():
                self._send()
        self.written += total

    def _send(self) -> None:
        if self.upload_id is None:
            out = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self.upload_id = out["UploadId"]
        number = len(self.parts) + len(self.inflight) + 1
        if number > MAX_PARTS:
            raise InvalidArgumentError(
                f"writing s3://{self.path}: more than {MAX_PARTS} parts of a multipart upload "
                f"(parts from {self.base} bytes, growing); S3 objects are at most 5 TiB"
            )
        body, self.buffer = self.buffer, bytearray()
        coro = self.fs._call_s3(
            "upload_part",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,
        )
        self.inflight.append((number, asyncio.run_coroutine_threadsafe(coro, self.fs.loop)))
        while len(self.inflight) >= self.concurrency:
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
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        self.buffer = bytearray()
        self.fs.invalidate_cache(self.path)
        return etag_of(out)

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
