"""S3 through s3fs: what differs from any other fsspec filesystem is decided here.

- Writes. A data file goes up as one multipart upload: parts of :data:`PART_BYTES` are
  sent while the next is filled, at most :data:`UPLOAD_CONCURRENCY` in flight, so a rank
  holds at most that many parts in memory, never a copy of its whole file; a file smaller
  than one part is a single PUT. ``publish`` is one PUT (never a multipart upload),
  create-only (``If-None-Match: *``) for the index, on stores that support it. A rename
  is a server-side copy per file, in parallel, then one batched delete of the sources
  (DeleteObjects, 1000 keys a request).
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
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgumentError, NotFoundError, PermissionDeniedError, StorageError
from .base import Location, s3_code, translate_errors
from .fsspec import FsspecBackend, etag_of

PART_BYTES = 8 << 20
"""Size of one part of an S3 multipart upload (S3 needs at least 5 MiB but for the last)."""
UPLOAD_CONCURRENCY = 8
"""Parts of one file in flight at once; memory per writing rank is about this times
:data:`PART_BYTES`."""
_MIN_PART = 5 << 20
_MAX_PARTS = 10_000
_DELETE_BATCH = 1000


class S3Backend(FsspecBackend):
    kind = "s3"
    publish_options = {"chunksize": 5 << 30}  # one PUT up to S3's 5 GiB limit

    def handles(self, fs: Any) -> bool:
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        return "s3" in protocols and hasattr(fs, "_call_s3")

    def open_writer(self, loc: Location, fsync: bool) -> _MultipartUpload:
        return _MultipartUpload(loc)

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
    while the caller fills the next one; part ``n`` is ``PART_BYTES * (1 + n // 1000)``
    bytes, so 10,000 parts reach far beyond any one rank's file. Nothing is visible until
    ``close`` completes the upload; ``abort`` leaves no object and no parts behind.
    """

    def __init__(self, loc: Location):
        self.fs = loc.fs
        self.path = loc.path
        self.bucket, self.key, _ = loc.fs.split_path(loc.path)
        self.written = 0
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.inflight: collections.deque = collections.deque()
        self.parts: list[dict] = []

    def _part_size(self) -> int:
        started = len(self.parts) + len(self.inflight)
        return max(PART_BYTES, _MIN_PART) * (1 + started // 1000)

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
        if number > _MAX_PARTS:
            raise InvalidArgumentError(f"s3://{self.path}: more than {_MAX_PARTS} parts")
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
