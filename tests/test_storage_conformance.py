"""The storage layer's contract, one test class run on every kind of storage.

As fsspec's ``tests/abstract`` and zarr-python's ``StoreTests`` do, :class:`TestStorage`
runs against local files (under ``tmp_path``), fsspec's ``memory://`` (a root of its own
per test, removed after it) and the real S3 server of ``tests/s3server.py`` (moto's, on
loopback). Every primitive of ``shardsave.storage`` that callers use is covered: streamed
writes and their abort, publish (create-only), whole and ranged reads, listings and their
freshness, delete, rename, size and errors.

What is checked is what the code does today. Where the kinds of storage differ the test
says so and why (an aborted local write leaves its partial file; a local publish always
replaces; S3 answers a range wholly past the end with 416).

Files "written by someone else" go through a client of their own (``os`` directly, a
second fsspec instance, boto3), so that a stale cache of this process would be caught.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import fsspec
import numpy as np
import pytest

from shardsave import storage
from shardsave.errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
)

MiB = 1 << 20


class Store:
    """One directory on one kind of storage, and a second client to it."""

    def __init__(self, kind: str, url: str, options: dict | None, server=None):
        self.kind = kind
        self.url = url
        self.options = options
        self.server = server
        self.dir = storage.resolve(url, options)
        storage.makedirs(self.dir)

    # a client that is not this process's storage layer (no shared caches)
    def put(self, name: str, data: bytes) -> None:
        loc = self.dir.child(name)
        if self.kind == "local":
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            with open(loc.path, "wb") as f:
                f.write(data)
        elif self.kind == "memory":
            fsspec.filesystem("memory", skip_instance_cache=True).pipe_file(loc.path, data)
        else:
            bucket, key = loc.path.split("/", 1)
            self.server.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, name: str) -> bytes | None:
        loc = self.dir.child(name)
        if self.kind == "local":
            try:
                with open(loc.path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        if self.kind == "memory":
            other = fsspec.filesystem("memory", skip_instance_cache=True)
            return other.cat_file(loc.path) if other.exists(loc.path) else None
        bucket, key = loc.path.split("/", 1)
        try:
            return self.server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.server.client().exceptions.NoSuchKey:
            return None

    def delete(self, name: str) -> None:
        loc = self.dir.child(name)
        if self.kind == "local":
            os.unlink(loc.path)
        elif self.kind == "memory":
            fsspec.filesystem("memory", skip_instance_cache=True).rm_file(loc.path)
        else:
            bucket, key = loc.path.split("/", 1)
            self.server.client().delete_object(Bucket=bucket, Key=key)

    def names(self) -> list[str]:
        """Every name under the directory (recursively), straight from the store."""
        if self.kind == "local":
            return sorted(
                os.path.relpath(os.path.join(root, f), self.dir.path)
                for root, _, files in os.walk(self.dir.path)
                for f in files
            )
        if self.kind == "memory":
            other = fsspec.filesystem("memory", skip_instance_cache=True)
            return sorted(p[len(self.dir.path) + 1 :] for p in other.find(self.dir.path))
        key = self.dir.path.split("/", 1)[1] + "/"
        return [k[len(key) :] for k in self.server.keys(key)]

    def uploads(self) -> list[str]:
        """Keys of unfinished multipart uploads under the directory (S3 only)."""
        bucket, key = self.dir.path.split("/", 1)
        out = self.server.client().list_multipart_uploads(Bucket=bucket, Prefix=key + "/")
        return [u["Key"] for u in out.get("Uploads", [])]


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store("local", str(tmp_path / "d"), None)
        return
    if request.param == "memory":
        root = f"memory://conformance-{uuid.uuid4().hex}"
        yield Store("memory", root + "/d", None)
        fs = fsspec.filesystem("memory")
        if fs.exists(fs._strip_protocol(root)):
            fs.rm(fs._strip_protocol(root), recursive=True)
        assert not fs.exists(fs._strip_protocol(root))
        return
    server = request.getfixturevalue("s3_server")
    yield Store("s3", request.getfixturevalue("s3_dir"), server.options(), server)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write(loc: storage.Location, *chunks, fsync: bool = False) -> storage.Writer:
    w = storage.Writer(loc, fsync=fsync)
    for chunk in chunks:
        w.write(chunk)
    w.close()
    return w


class TestStorage:
    # ------------------------------------------------------------ streamed writes
    def test_writer_streams_chunks_and_close_makes_the_exact_file(self, store):
        data = random_bytes(12 * MiB + 3)
        as_floats = np.frombuffer(data[100 : 100 + 4 * 1000], np.float32)
        chunks = [
            data[:100],
            as_floats,
            memoryview(data)[4100:4101],
            bytearray(data[4101 : 9 * MiB]),
            memoryview(data)[9 * MiB :],
        ]  # bytes, a float array, one byte, large buffers
        w = write(store.dir.child("a.bin"), *chunks, fsync=store.kind == "local")
        assert w.written == len(data)
        assert store.get("a.bin") == data
        a = store.dir.child("a.bin")
        assert storage.size(a) == len(data) == storage.info(a)["size"]
        assert storage.read_bytes(a) == data
        if store.kind == "s3":  # 12 MiB goes up as a multipart upload of 8 MiB parts
            bucket, key = a.path.split("/", 1)
            etag = store.server.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
            assert w.etag == etag and etag.endswith("-2")
            assert store.uploads() == []
        else:
            assert w.etag is None

    def test_small_and_empty_files(self, store):
        w = write(store.dir.child("small.bin"), b"abc", b"", b"de")
        assert (w.written, store.get("small.bin")) == (5, b"abcde")
        if store.kind == "s3":  # smaller than a part: one PUT, whose ETag is the MD5
            assert w.etag == hashlib.md5(b"abcde").hexdigest()
        e = write(store.dir.child("empty.bin"))
        assert e.written == 0 and store.get("empty.bin") == b""
        assert storage.size(store.dir.child("empty.bin")) == 0 and storage.exists(
            store.dir.child("empty.bin")
        )

    def test_writer_replaces_an_existing_file(self, store):
        store.put("a.bin", b"old contents, longer than the new")
        write(store.dir.child("a.bin"), b"new")
        assert store.get("a.bin") == b"new" and storage.size(store.dir.child("a.bin")) == 3

    def test_abort(self, store):
        data = random_bytes(9 * MiB)  # more than one S3 part: the multipart upload has begun
        w = storage.Writer(store.dir.child("aborted.bin"), fsync=False)
        w.write(data[: 8 * MiB])
        w.write(data[8 * MiB :])
        w.abort()
        loc = store.dir.child("aborted.bin")
        if store.kind == "s3":  # the upload is aborted, not completed: no object, no parts
            assert store.get("aborted.bin") is None and not storage.exists(loc)
            assert store.names() == [] and store.uploads() == []
            assert storage.pending_uploads(store.dir) == []
        else:  # a file system's file is closed as it stands: the partial file stays
            assert store.get("aborted.bin") == data and storage.size(loc) == len(data)

    def test_abort_before_any_write(self, store):
        w = storage.Writer(store.dir.child("nothing.bin"), fsync=False)
        w.abort()
        w.abort()  # twice is harmless
        if store.kind == "s3":
            assert store.names() == [] and store.uploads() == []
        else:
            assert store.get("nothing.bin") == b""

    # ------------------------------------------------------------ publish
    def test_publish_replaces_atomically_and_leaves_no_temp_file(self, store):
        idx = store.dir.child("m.index")
        storage.publish(idx, b"one", fsync=store.kind == "local")
        assert store.get("m.index") == b"one"
        storage.publish(idx, b"two!", fsync=False)
        assert store.get("m.index") == b"two!" and storage.size(idx) == 4
        assert store.names() == ["m.index"]  # no temp file left behind

    def test_publish_exclusive_is_create_only(self, store):
        idx = store.dir.child("m.index")
        storage.publish(idx, b"first", fsync=False, exclusive=True)
        assert store.get("m.index") == b"first"
        if store.kind == "local":
            # locally the replace always overwrites: a local save publishes only its journal,
            # under a name of its own, and renames it over the index (commit.py)
            storage.publish(idx, b"second", fsync=False, exclusive=True)
            assert store.get("m.index") == b"second"
            return
        message = (
            f"publishing {idx.url}: it appeared while this save was running; "
            "is another job saving to the same prefix?"
        )
        with pytest.raises(FailedPreconditionError, match=f"^{re.escape(message)}$"):
            storage.publish(idx, b"second", fsync=False, exclusive=True)
        assert store.get("m.index") == b"first" and storage.read_bytes(idx) == b"first"
        store.put("other.index", b"by someone else")  # appeared meanwhile, unseen by this process
        with pytest.raises(FailedPreconditionError):
            storage.publish(store.dir.child("other.index"), b"mine", exclusive=True)
        assert store.get("other.index") == b"by someone else"

    # ------------------------------------------------------------ reads
    def test_read_bytes_whole_head_and_missing(self, store):
        data = random_bytes(1000)
        store.put("x.bin", data)
        store.put("empty.bin", b"")
        x = store.dir.child("x.bin")
        assert storage.read_bytes(x) == data
        assert storage.read_bytes(x, limit=10) == data[:10]
        assert storage.read_bytes(x, limit=5000) == data
        assert storage.read_bytes(store.dir.child("empty.bin")) == b""
        assert storage.read_bytes(store.dir.child("empty.bin"), limit=4) == b""  # S3: a 416, read another way
        missing = store.dir.child("missing.bin")
        assert storage.read_bytes(missing, missing_ok=True) is None
        assert storage.read_bytes(missing, missing_ok=True, limit=4) is None
        with pytest.raises(NotFoundError, match=f"^reading {re.escape(missing.url)}: not found"):
            storage.read_bytes(missing)
        with pytest.raises(NotFoundError, match=re.escape(missing.url)):
            storage.read_bytes(missing, limit=4)

    def test_read_ranges_fill_preallocated_buffers(self, store):
        data = random_bytes(3 * MiB + 17, seed=1)
        store.put("x.bin", data)
        x = store.dir.child("x.bin")
        ranges = [(2 * MiB, 1000), (0, 10), (5, 20), (len(data) - 7, 7), (MiB, MiB)]  # unordered, overlapping
        arrays = [np.full(n, 0xAA, np.uint8) for _, n in ranges]
        done = []
        storage.read_ranges(
            x, [(o, memoryview(a)) for (o, _), a in zip(ranges, arrays, strict=True)], after=done.append
        )
        for (o, n), a in zip(ranges, arrays, strict=True):
            assert a.tobytes() == data[o : o + n]
        assert sorted(done) == list(range(len(ranges)))
        one = bytearray(4)
        storage.read_ranges(x, [(9, memoryview(one))], after=done.append)
        assert bytes(one) == data[9:13] and done[-1] == 0
        storage.read_ranges(x, [])  # nothing to do
        storage.read_ranges(store.dir.child("missing.bin"), [])  # not even a check

    @staticmethod
    @contextlib.contextmanager
    def open_local_file(store, why: str):
        """``x.bin`` holding ``0123456789``, open for reading: (its location, the descriptor)."""
        if store.kind != "local":
            pytest.skip(f"{why} is for local files only")
        store.put("x.bin", b"0123456789")
        x = store.dir.child("x.bin")
        fd = storage.open_local(x)
        try:
            yield x, fd
        finally:
            storage.close_local(fd)

    def test_read_ranges_from_an_open_local_file(self, store):
        with self.open_local_file(store, "open_local (in-place restore)") as (x, fd):
            store.delete("x.bin")  # the descriptor keeps reading the file it opened
            store.put("x.bin", b"abcdefghij")
            buf = bytearray(3)
            storage.read_ranges(x, [(2, memoryview(buf))], fd=fd)
            assert bytes(buf) == b"234"
        with pytest.raises(NotFoundError, match=re.escape(store.dir.child("nope").url)):
            storage.open_local(store.dir.child("nope"))

    def test_read_local_run_fills_buffers_one_after_the_other(self, store):
        with self.open_local_file(store, "read_local_run (direct restore)") as (x, fd):
            bufs = [bytearray(3), bytearray(0), bytearray(4)]
            storage.read_local_run(x, fd, 1, [memoryview(b) for b in bufs])
            assert [bytes(b) for b in bufs] == [b"123", b"", b"4567"]
            with pytest.raises(
                DataLossError,
                match=f"^{re.escape(x.url)}: file too short: wanted 8 bytes at offset 4, got 6$",
            ):
                storage.read_local_run(x, fd, 4, [memoryview(bytearray(5)), memoryview(bytearray(3))])

    def test_read_ranges_of_a_short_file_is_data_loss(self, store):
        store.put("x.bin", b"0123456789")
        x = store.dir.child("x.bin")
        with pytest.raises(
            DataLossError, match=f"^{re.escape(x.url)}: file too short: wanted 10 bytes at offset 5, got 5$"
        ):
            storage.read_ranges(x, [(0, memoryview(bytearray(2))), (5, memoryview(bytearray(10)))])
        past = [(20, memoryview(bytearray(3)))]
        if store.kind == "s3":
            # S3 refuses a range wholly past the end (416 InvalidRange), which s3fs makes EINVAL
            with pytest.raises(StorageError, match="not satisfiable") as info:
                storage.read_ranges(x, past)
            assert type(info.value) is StorageError and info.value.errno == errno.EINVAL
        else:
            with pytest.raises(DataLossError, match="wanted 3 bytes at offset 20, got 0$"):
                storage.read_ranges(x, past)
        with pytest.raises(
            NotFoundError, match=f"^reading {re.escape(store.dir.child('nope').url)}: not found"
        ):
            storage.read_ranges(store.dir.child("nope"), [(0, memoryview(bytearray(1)))])

    # ------------------------------------------------------------ listings
    def test_files_in_and_scan(self, store):
        store.put("b.index", b"12345")
        store.put("a.bin", b"1")
        store.put("sub/inner.bin", b"22")  # a directory's contents are not its files
        files = storage.files_in(store.dir)
        assert sorted(files) == ["a.bin", "b.index"]
        entry = files["b.index"]
        assert set(entry) == {"name", "size", "mtime", "etag", "version"}
        assert (entry["name"], entry["size"]) == ("b.index", 5) and entry["mtime"] > 1.6e9
        if store.kind == "s3":
            assert entry["etag"] == hashlib.md5(b"12345").hexdigest()
        else:
            assert entry["etag"] is None
        assert [f.path for f, _ in storage.scan(store.dir, "*.index")] == [store.dir.child("b.index").path]
        assert [(f.name, i["size"]) for f, i in storage.scan(store.dir)] == [("a.bin", 1), ("b.index", 5)]
        assert [(f.name, sorted(i)) for f, i in storage.scan(store.dir, "a*")] == [
            ("a.bin", ["mtime", "size"])
        ]
        missing = store.dir.child("no-such-dir")
        assert storage.files_in(missing) == {} and storage.scan(missing) == []
        # a file listed as a directory: locally nothing (ENOTDIR); fsspec's ls of a file
        # answers the file itself
        assert sorted(storage.files_in(store.dir.child("a.bin"))) == (
            [] if store.kind == "local" else ["a.bin"]
        )

    def test_version_changes_when_a_file_is_replaced(self, store):
        store.put("f", b"one")
        before = storage.files_in(store.dir)["f"]["version"]
        store.put("f", b"three")
        after = storage.files_in(store.dir)["f"]
        assert after["version"] != before and after["size"] == 5

    def test_listings_see_what_others_wrote_since(self, store):
        """fsspec (s3fs) caches listings per filesystem object: none may hide a change."""
        store.put("old", b"1")
        assert sorted(storage.files_in(store.dir)) == ["old"]
        if store.kind != "local":
            store.dir.fs.ls(store.dir.path)  # fill fsspec's listing cache, as any caller might
            if store.kind == "s3":
                assert store.dir.path in store.dir.fs.dircache
        store.put("new", b"22")
        store.put("old", b"333")
        new = store.dir.child("new")
        assert storage.exists(new) and storage.size(new) == 2 and storage.info(new)["size"] == 2
        assert storage.size(store.dir.child("old")) == 3
        assert {k: v["size"] for k, v in storage.files_in(store.dir).items()} == {"new": 2, "old": 3}
        assert [f.name for f, _ in storage.scan(store.dir)] == ["new", "old"]
        assert [f.name for f, _ in storage.scan(store.dir, "n*")] == ["new"]
        store.put("m.data-00000-of-00001", b"4444")
        assert [(f.name, i["size"]) for f, i in storage.data_files(store.dir, "m")] == [
            ("m.data-00000-of-00001", 4)
        ]
        store.delete("new")
        assert not storage.exists(new) and storage.size(new) is None
        assert "new" not in storage.files_in(store.dir)

    def test_listing_after_own_writes(self, store):
        assert storage.files_in(store.dir) == {}
        write(store.dir.child("w.bin"), b"12")
        assert sorted(storage.files_in(store.dir)) == ["w.bin"]
        storage.publish(store.dir.child("p.index"), b"123", fsync=False)
        assert sorted(storage.files_in(store.dir)) == ["p.index", "w.bin"]
        storage.remove([store.dir.child("w.bin")])
        assert sorted(storage.files_in(store.dir)) == ["p.index"]
        storage.rename(store.dir.child("p.index"), store.dir.child("q.index"))
        assert sorted(storage.files_in(store.dir)) == ["q.index"]

    def test_data_files_match_names_exactly(self, store):
        odd = "ck[1]*?"  # glob characters, taken literally
        for name in (
            "m.data-00000-of-00002",
            "m.data-00001-of-00002",
            "m.index",
            "mm.data-00000-of-00001",
            "m-1.data-00000-of-00001",
            "m.data-00000-of-00002.tmp",
            f"{odd}.data-00000-of-00001",
            "ck1x.data-00000-of-00001",
            "ck1.data-00000-of-00001",
        ):
            store.put(name, name.encode())
        found = storage.data_files(store.dir, "m")
        assert [(f.name, i["size"]) for f, i in found] == [
            ("m.data-00000-of-00002", 21),
            ("m.data-00001-of-00002", 21),
        ]
        assert all(f.path == store.dir.child(f.name).path for f, _ in found)
        assert [f.name for f, _ in storage.data_files(store.dir, odd)] == [f"{odd}.data-00000-of-00001"]
        assert storage.data_files(store.dir, "ck") == []
        assert storage.data_files(store.dir.child("no-such-dir"), "m") == []

    # ------------------------------------------------------------ remove and rename
    def test_remove_several_missing_ones_fine_names_literal(self, store):
        for name in ("a", "b", "c[1]", "c1", "d*", "dd", "keep"):
            store.put(name, b"x")
        storage.remove([store.dir.child(n) for n in ("a", "b", "c[1]", "d*", "never-existed")])
        assert store.names() == ["c1", "dd", "keep"]
        storage.remove([])
        storage.remove([store.dir.child("never-existed")])
        assert [f.name for f, _ in storage.scan(store.dir)] == ["c1", "dd", "keep"]

    def test_rename_and_rename_all(self, store):
        store.put("a", b"A")
        store.put("b", b"B")
        store.put("x[1]", b"X")
        store.put("target", b"old target")
        assert storage.rename(store.dir.child("a"), store.dir.child("target")) is True
        assert store.get("target") == b"A" and store.get("a") is None
        assert storage.rename(store.dir.child("a"), store.dir.child("target")) is False  # moved already
        assert store.get("target") == b"A"
        missing = storage.rename_all(
            [
                (store.dir.child("b"), store.dir.child("b2")),
                (store.dir.child("gone"), store.dir.child("gone2")),
                (store.dir.child("x[1]"), store.dir.child("y")),
            ]
        )
        assert [m.path for m in missing] == [store.dir.child("gone").path]
        assert store.names() == ["b2", "target", "y"]
        assert (store.get("b2"), store.get("y")) == (b"B", b"X")
        assert storage.rename_all([]) == []
        assert sorted(storage.files_in(store.dir)) == ["b2", "target", "y"]

    # ------------------------------------------------------------ size, info, exists
    def test_size_info_exists(self, store):
        store.put("f", b"12345")
        f, missing = store.dir.child("f"), store.dir.child("missing")
        assert storage.exists(f) and storage.size(f) == 5
        info = storage.info(f)
        assert set(info) == {"size", "mtime"} and info["size"] == 5 and info["mtime"] > 1.6e9
        assert not storage.exists(missing) and storage.size(missing) is None
        with pytest.raises(NotFoundError, match=f"^checking {re.escape(missing.url)}: not found"):
            storage.info(missing)

    def test_makedirs(self, store):
        sub = store.dir.child("a/b")
        storage.makedirs(sub)
        storage.makedirs(sub)  # again: fine
        write(sub.child("f"), b"1")
        assert store.get("a/b/f") == b"1"
        if store.kind == "local":
            assert os.path.isdir(sub.path)
            store.put("file", b"1")
            with pytest.raises(
                InvalidArgumentError,
                match=f"^cannot create directory {re.escape(store.dir.path)}/file/x: "
                f"{re.escape(store.dir.path)}/file is a file, not a directory$",
            ):
                storage.makedirs(store.dir.child("file/x"))

    def test_fsync_dir(self, store):
        storage.fsync_dir(store.dir)  # a no-op off local files; locally it must not fail
        if store.kind == "local":
            with pytest.raises(NotFoundError, match=re.escape(store.dir.child("nope").url)):
                storage.fsync_dir(store.dir.child("nope"))
        else:
            storage.fsync_dir(store.dir.child("nope"))

    # ------------------------------------------------------------ locations
    def test_location_names(self, store):
        d = store.dir
        f = d.child("x.bin")
        assert f.name == "x.bin" and f.parent.path == d.path and f.with_path(d.path) == d
        assert storage.same_path(f, d.child("x.bin"))
        assert not storage.same_path(f, d.child("y.bin"))
        assert storage.is_directly_in(f, d)
        assert not storage.is_directly_in(d.child("sub/x.bin"), d)
        assert not storage.is_directly_in(d.child("../x.bin"), d.child("sub"))
        assert not storage.is_directly_in(d, d)
        if store.kind == "local":
            assert f.url == f.path == os.path.join(store.url, "x.bin")
            assert d.child("./y/../x.bin").path == f.path and storage.same_path(d.child("./x.bin"), f)
            assert d.child("/abs/z").path == "/abs/z"
            assert d.is_local and not d.is_s3
        elif store.kind == "memory":
            assert f.url == f"memory://{d.path}/x.bin" and not d.is_local and not d.is_s3
        else:
            assert f.url == f"{store.url}/x.bin" and d.is_s3 and not d.is_local
            assert d.child("./x.bin").path == d.path + "/./x.bin"  # ".." is a key segment on S3
            assert not storage.is_directly_in(d.child("./x.bin"), d)

    def test_resolve(self, store):
        with pytest.raises(InvalidArgumentError, match="empty checkpoint path"):
            storage.resolve("")
        with pytest.raises(InvalidArgumentError, match="either fs or storage_options"):
            storage.resolve(store.url, {"a": 1}, fs=store.dir.fs)
        again = storage.resolve(store.url, store.options)
        assert again.path == store.dir.path and again.url == store.dir.url
        given = storage.resolve(store.url, fs=store.dir.fs)
        assert given.fs is store.dir.fs and given.path == store.dir.path

    # ------------------------------------------------------------ pending uploads
    def test_pending_uploads_and_abort_upload(self, store):
        if store.kind != "s3":
            assert storage.pending_uploads(store.dir) == []
            return
        client = store.server.client()
        bucket, key = store.dir.path.split("/", 1)
        mine = client.create_multipart_upload(Bucket=bucket, Key=f"{key}/x.bin")["UploadId"]
        client.create_multipart_upload(Bucket=bucket, Key=f"{key}/sub/y.bin")  # not directly in the dir
        pending = storage.pending_uploads(store.dir)
        assert [(loc.path, upload) for loc, upload, _ in pending] == [(store.dir.child("x.bin").path, mine)]
        assert isinstance(pending[0][2], float)  # moto's Initiated is a fixed date
        storage.abort_upload(pending[0][0], mine)
        assert storage.pending_uploads(store.dir) == []
        assert store.uploads() == [f"{key}/sub/y.bin"]

    # ------------------------------------------------------------ errors
    def test_missing_file_is_not_found_naming_it(self, store):
        missing = store.dir.child("missing.bin")
        for action, call in (
            ("reading", lambda: storage.read_bytes(missing)),
            ("checking", lambda: storage.info(missing)),
            ("reading", lambda: storage.read_ranges(missing, [(0, memoryview(bytearray(1)))])),
        ):
            with pytest.raises(NotFoundError, match=f"^{action} {re.escape(missing.url)}: not found") as info:
                call()
            assert not storage.missing_bucket(info.value)

    def test_missing_bucket_is_not_found_and_never_created(self, store):
        if store.kind != "s3":
            pytest.skip("buckets are S3's")
        bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
        d = storage.resolve(f"s3://{bucket}/run", store.options)
        f = d.child("f")
        calls = {
            "reading": [
                lambda: storage.read_bytes(f),
                lambda: storage.read_bytes(f, missing_ok=True),
                lambda: storage.read_bytes(f, limit=4),
                lambda: storage.read_ranges(f, [(0, memoryview(bytearray(1)))]),
            ],
            "checking": [lambda: storage.size(f), lambda: storage.info(f)],
            "listing": [
                lambda: storage.files_in(d),
                lambda: storage.scan(d),
                lambda: storage.data_files(d, "m"),
            ],
            "publishing": [
                lambda: storage.publish(f, b"x"),
                lambda: storage.publish(f, b"x", exclusive=True),
            ],
            "closing": [lambda: write(f, b"x")],
            "deleting": [lambda: storage.remove([f])],
            "renaming": [lambda: storage.rename(f, d.child("g"))],
            "listing uploads in": [lambda: storage.pending_uploads(d)],
        }
        for action, fns in calls.items():
            for fn in fns:
                with pytest.raises(NotFoundError) as info:
                    fn()
                assert re.match(
                    f"^{action} s3://{bucket}/run(/f)?: bucket '{bucket}' does not exist$", str(info.value)
                ), str(info.value)
                assert storage.missing_bucket(info.value)
        assert storage.exists(f) is False  # exists answers, it does not raise
        with pytest.raises(
            NotFoundError, match=f"^writing to s3://{bucket}/run: bucket '{bucket}' does not exist$"
        ):
            storage.makedirs(d)  # (raised from None: missing_bucket() cannot tell, as today)
        assert bucket not in [b["Name"] for b in store.server.client().list_buckets()["Buckets"]]

    def test_permission_denied_on_local_files(self, store):
        if store.kind != "local":
            pytest.skip("file permissions are the local file system's")
        base = tempfile.mkdtemp()  # in /tmp: tmp_path's parents are 0700, closed to nobody
        try:
            os.chmod(base, 0o755)
            ro = os.path.join(base, "ro")
            os.mkdir(ro)
            with open(os.path.join(ro, "secret"), "wb") as f:
                f.write(b"s")
            with open(os.path.join(ro, "f"), "wb") as f:
                f.write(b"f")
            os.mkdir(os.path.join(ro, "closed"))
            os.chmod(os.path.join(ro, "secret"), 0)
            os.chmod(os.path.join(ro, "closed"), 0)
            os.chmod(ro, 0o555)
            out = subprocess.run(
                [sys.executable, "-c", _DENIED_SCRIPT, ro],
                capture_output=True,
                text=True,
                timeout=120,
                env=dict(os.environ, PYTHONPATH=_pythonpath()),
            )
            assert out.returncode == 0, out.stderr
            results = json.loads(out.stdout)
        finally:
            for root, dirs, _ in os.walk(base):
                for d in dirs:
                    os.chmod(os.path.join(root, d), 0o755)
            shutil.rmtree(base)
        want = {
            "read_bytes": f"reading {ro}/secret",
            "read_ranges": f"reading {ro}/secret",
            "open_local": f"reading {ro}/secret",
            "publish": f"publishing {ro}/new",
            "writer": f"creating {ro}/new",
            "remove": f"deleting {ro}/f",
            "rename": f"renaming {ro}/f",
            "files_in": f"listing {ro}/closed",
            "makedirs": f"creating directory {ro}/sub",
        }
        assert set(results) == set(want)
        for what, start in want.items():
            r = results[what]
            assert r["cls"] == PermissionDeniedError.__name__ and r["is_os_permission"], (what, r)
            assert r["message"] == f"{start}: Permission denied (EACCES)", (what, r)
            assert (r["errno"], r["filename"]) == (errno.EACCES, start.split(" ")[-1]), (what, r)


def _pythonpath() -> str:
    import shardsave

    return os.pathsep.join(
        [os.path.dirname(os.path.dirname(shardsave.__file__)), os.environ.get("PYTHONPATH", "")]
    )


_DENIED_SCRIPT = r"""
import json, os, sys
from shardsave import storage
ro = sys.argv[1]
if os.geteuid() == 0:  # root is never refused: be nobody
    os.setgid(65534)
    os.setuid(65534)
d = storage.resolve(ro)
calls = {
    "read_bytes": lambda: storage.read_bytes(d.child("secret")),
    "read_ranges": lambda: storage.read_ranges(d.child("secret"), [(0, memoryview(bytearray(1)))]),
    "open_local": lambda: storage.open_local(d.child("secret")),
    "publish": lambda: storage.publish(d.child("new"), b"x"),
    "writer": lambda: storage.Writer(d.child("new")),
    "remove": lambda: storage.remove([d.child("f")]),
    "rename": lambda: storage.rename(d.child("f"), d.child("g")),
    "files_in": lambda: storage.files_in(d.child("closed")),
    "makedirs": lambda: storage.makedirs(d.child("sub")),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = {"cls": None}
    except Exception as exc:
        out[name] = {"cls": type(exc).__name__, "message": str(exc), "errno": getattr(exc, "errno", None),
                     "filename": getattr(exc, "filename", None),
                     "is_os_permission": isinstance(exc, PermissionError)}
print(json.dumps(out))
"""
