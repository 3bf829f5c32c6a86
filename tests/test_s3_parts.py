"""S3 multipart uploads at scale: the part size rule, its fallback, and the storage options
that set part size and concurrency (``upload_part_size``, ``upload_concurrency``).

The rule is tested as a pure function (with hypothesis: S3's limits hold for any expected
size, right, wrong or missing); the uploads against the real S3 server of
``tests/s3server.py``, where the parts an object was made of are read back from the server
(``HeadObject`` with ``PartNumber``: that part's size and the object's part count).
"""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import shardsave as ss
from shardsave import storage
from shardsave.errors import InvalidArgumentError
from shardsave.storage import s3

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
MAX_OBJECT = 5 * TiB  # S3's largest object


@pytest.fixture(autouse=True)
def fresh_graph():
    ss.reset_default_graph()


# ------------------------------------------------------------------ the rule, pure
def upload_parts(total: int, base: int) -> list[tuple[int, int]]:
    """``[(part size, how many)]`` an upload of ``total`` bytes takes from ``base``, as
    ``_MultipartUpload`` cuts it: whole groups of ``GROWTH_PARTS`` parts of one size."""
    out, left, number = [], total, 1
    while left > 0:
        size = s3.part_bytes(number, base)
        count = min(s3.GROWTH_PARTS - (number - 1) % s3.GROWTH_PARTS, -(-left // size))
        out.append((size, count))
        left -= size * count
        number += count
    return out


def part_count(total: int, base: int) -> int:
    return sum(n for _, n in upload_parts(total, base))


@pytest.mark.parametrize(
    ("size", "part", "parts"),
    [
        (None, 8 * MiB, None),
        (100 * MiB, 8 * MiB, 13),
        (512 * MiB, 8 * MiB, 64),
        (1 * GiB, 16 * MiB, 64),
        (4 * GiB, 64 * MiB, 64),
        (8 * GiB, 128 * MiB, 64),
        (100 * GiB, 128 * MiB, 800),  # not 12,800 parts of 8 MiB
        (125 * GiB, 128 * MiB, 1000),
        (1 * TiB, 1049 * MiB, 1000),  # 1/1000 of the file, rounded up to MiB
        (MAX_OBJECT, 5 * GiB, 1024),  # S3's largest part
    ],
)
def test_part_size_rule_examples(size, part, parts):
    base = s3.base_part_size(size)
    assert base == part
    if size is not None:
        assert part_count(size, base) == parts


def test_parts_double_every_thousand_past_the_expected_size():
    base = 8 * MiB
    assert [s3.part_bytes(n, base) for n in (1, 1000, 1001, 2000, 2001, 3001)] == [
        base,
        base,
        2 * base,
        2 * base,
        4 * base,
        8 * base,
    ]
    assert s3.part_bytes(10_000, 1 * GiB) == s3.MAX_PART  # never past S3's largest part
    # with no size given, the 10,000 parts still hold S3's largest object (and more)
    assert part_count(MAX_OBJECT, s3.base_part_size(None)) <= s3.MAX_PARTS
    assert sum(s3.part_bytes(n, 8 * MiB) for n in range(1, s3.MAX_PARTS + 1)) == 1_023_000 * 8 * MiB


def test_part_size_option_is_used_as_given_unless_too_small_for_the_size():
    assert s3.base_part_size(None, 5 * MiB + 1) == 5 * MiB + 1
    assert s3.base_part_size(1 * GiB, 6 * MiB) == 6 * MiB  # 171 parts: fine
    assert s3.base_part_size(100 * GiB, 8 * MiB) == 103 * MiB  # raised to 1000 parts
    assert s3.base_part_size(10 * TiB, 5 * MiB) == s3.MAX_PART


sizes = st.one_of(st.none(), st.integers(0, 2 * MAX_OBJECT))


@settings(max_examples=300, deadline=None)
@given(
    hint=sizes,
    actual=st.integers(0, MAX_OBJECT),
    option=st.one_of(st.none(), st.integers(s3.MIN_PART, s3.MAX_PART)),
)
@example(hint=None, actual=MAX_OBJECT, option=None)
@example(hint=1, actual=MAX_OBJECT, option=None)
@example(hint=600 * GiB, actual=MAX_OBJECT, option=8 * MiB)  # a hint 8x too small
@example(hint=None, actual=MAX_OBJECT, option=6 * MiB)
def test_any_hint_keeps_s3_limits(hint, actual, option):
    base = s3.base_part_size(hint, option)
    assert s3.MIN_PART <= base <= s3.MAX_PART
    parts = upload_parts(actual, base)
    assert all(s3.MIN_PART <= size <= s3.MAX_PART for size, _ in parts)
    count = sum(n for _, n in parts)
    if hint is not None and actual <= hint <= s3.GROWTH_PARTS * s3.MAX_PART:
        # a right (or generous) hint: one part size, at most 1000 parts, no growth
        assert len(parts) <= 1 and count <= s3.GROWTH_PARTS
        if option is None:  # the rule's own choice: whole MiB, 8 to 128 MiB up to 125 GiB
            assert base % MiB == 0 and base >= s3.PART_BYTES
            assert base <= max(s3.AUTO_MAX_PART, hint // 1000 + MiB)  # memory: 8 parts of it
            if 8 * GiB <= hint:
                assert count <= 8 * -(-hint // GiB)  # at most 8 requests per GiB
    if option is None or option >= -(-MAX_OBJECT // 1_023_000):
        # wrong, missing or right: S3's largest object always fits in 10,000 parts
        assert count <= s3.MAX_PARTS
    elif actual <= 1_023_000 * option:
        assert count <= s3.MAX_PARTS


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("upload_part_size", 5 * MiB - 1),
        ("upload_part_size", 5 * GiB + 1),
        ("upload_part_size", 0),
        ("upload_part_size", "8MiB"),
        ("upload_part_size", 8.0 * MiB),
        ("upload_part_size", True),
        ("upload_part_size", None),
        ("upload_concurrency", 0),
        ("upload_concurrency", -3),
        ("upload_concurrency", 1.5),
        ("upload_concurrency", "4"),
    ],
)
def test_bad_option_values_name_the_option_and_its_range(name, value, tmp_path):
    want = "5 MiB" if name == "upload_part_size" else "at least 1"
    for url in (str(tmp_path), "memory://shardsave-options"):  # checked wherever the path is
        with pytest.raises(InvalidArgumentError, match=rf"storage option {name}=.*{want}"):
            storage.resolve(url, {name: value})


def test_options_on_other_filesystems_are_checked_and_ignored(tmp_path):
    options = {"upload_part_size": 6 * MiB, "upload_concurrency": 2}
    for url in (str(tmp_path / "x"), "memory://shardsave-options/x"):
        loc = storage.resolve(url, options)
        assert not loc.is_s3
        w = storage.Writer(loc, fsync=False, size_hint=3)
        w.write(b"abc")
        w.close()
        assert storage.read_bytes(loc) == b"abc"


# ------------------------------------------------------------------ on the S3 server
def parts_of(server, url: str) -> list[int]:
    """The size of each part of the object at ``url``, from the server."""
    client = server.client()
    key = url.split("/", 3)[3]
    head = client.head_object(Bucket=server.bucket, Key=key, PartNumber=1)
    count = head.get("PartsCount", 1)
    sizes = [head["ContentLength"]]
    for n in range(2, count + 1):
        sizes.append(client.head_object(Bucket=server.bucket, Key=key, PartNumber=n)["ContentLength"])
    etag = client.head_object(Bucket=server.bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith(f"-{count}") or count == 1
    return sizes


def upload(loc: storage.Location, data: np.ndarray, size_hint=None, chunk: int = 3 * MiB) -> None:
    w = storage.Writer(loc, fsync=False, size_hint=size_hint)
    view = memoryview(data)
    for start in range(0, len(view), chunk):  # as a save streams it: many writes
        w.write(view[start : start + chunk])
    w.close()
    assert w.written == data.size
    assert storage.read_bytes(loc) == data.tobytes()


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(7).integers(0, 256, 20 * MiB, dtype=np.uint8)


def test_upload_parts_follow_the_size_hint(s3_server, s3_dir, data):
    d = storage.resolve(s3_dir, s3_server.options())
    upload(d.child("none.bin"), data)  # no size given: 8 MiB parts
    assert parts_of(s3_server, f"{s3_dir}/none.bin") == [8 * MiB, 8 * MiB, 4 * MiB]
    # a 1 GiB file has 16 MiB parts; a wrong hint (20 MiB written) costs requests, no more
    upload(d.child("big.bin"), data, size_hint=1 * GiB)
    assert parts_of(s3_server, f"{s3_dir}/big.bin") == [16 * MiB, 4 * MiB]
    # a right one under 512 MiB keeps 8 MiB parts; smaller than a part: one PUT
    upload(d.child("right.bin"), data, size_hint=data.size)
    assert parts_of(s3_server, f"{s3_dir}/right.bin") == [8 * MiB, 8 * MiB, 4 * MiB]
    upload(d.child("tiny.bin"), data[:100], size_hint=100)
    assert parts_of(s3_server, f"{s3_dir}/tiny.bin") == [100]


def test_parts_grow_past_the_expected_size(s3_server, s3_dir, data, monkeypatch):
    monkeypatch.setattr(s3, "GROWTH_PARTS", 1)  # so that growth shows in a few parts
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)
    d = storage.resolve(s3_dir, s3_server.options())
    upload(d.child("grow.bin"), data, size_hint=3 * MiB)  # expected less than one part
    assert parts_of(s3_server, f"{s3_dir}/grow.bin") == [5 * MiB, 10 * MiB, 5 * MiB]


def peak_part_uploads(monkeypatch, fs) -> list[int]:
    """Watch the real requests of ``fs``: the most ``upload_part`` requests at once."""
    real, state = fs._call_s3, {"now": 0, "peak": 0}

    async def watched(method, *args, **kwargs):
        if method != "upload_part":
            return await real(method, *args, **kwargs)
        state["now"] += 1  # on s3fs's one event loop thread: no lock needed
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(0.05)  # let the others start, if they may
            return await real(method, *args, **kwargs)
        finally:
            state["now"] -= 1

    monkeypatch.setattr(fs, "_call_s3", watched)
    return state


def test_saver_options_set_part_size_and_concurrency(s3_server, s3_dir, monkeypatch):
    big = np.random.default_rng(1).standard_normal((1600, 2048)).astype(np.float32)  # 12.5 MiB
    ss.Variable("big", big)
    base_options = s3_server.options()
    for concurrency, part in ((1, 6 * MiB), (2, 5 * MiB)):
        options = {**base_options, "upload_part_size": part, "upload_concurrency": concurrency}
        loc = storage.resolve(f"{s3_dir}/m{concurrency}", options)
        assert (loc.backend.part_size, loc.backend.concurrency) == (part, concurrency)
        state = peak_part_uploads(monkeypatch, loc.fs)
        ss.Saver(storage_options=options).save(f"{s3_dir}/m{concurrency}")
        monkeypatch.undo()
        file = f"{s3_dir}/m{concurrency}.data-00000-of-00001"
        sizes = parts_of(s3_server, file)
        assert sizes[:-1] == [part] * (len(sizes) - 1) and 0 < sizes[-1] <= part
        assert sum(sizes) == big.nbytes
        assert state["peak"] == concurrency
        reader = ss.CheckpointReader(f"{s3_dir}/m{concurrency}", storage_options=options)
        assert np.array_equal(reader.get_tensor("big"), big)
    # the default: 8 in flight, more than one at once
    loc = storage.resolve(f"{s3_dir}/d", base_options)
    state = peak_part_uploads(monkeypatch, loc.fs)
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)
    upload(loc, np.zeros(40 * MiB, np.uint8))
    assert 1 < state["peak"] <= s3.UPLOAD_CONCURRENCY


def test_a_save_sizes_its_parts_from_its_data_file(s3_server, s3_dir, monkeypatch):
    """A rank knows its data file's size before it writes it: the rule gets it. (Scaled
    down: 2 parts aimed at, 5 MiB the smallest; a 12.5 MiB file then has 7 MiB parts, where
    a file of unknown size would have 5 MiB ones.)"""
    monkeypatch.setattr(s3, "TARGET_PARTS", 2)
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)
    big = np.random.default_rng(2).standard_normal((1600, 2048)).astype(np.float32)
    ss.Variable("big", big)
    ss.Saver(storage_options=s3_server.options()).save(f"{s3_dir}/sized")
    assert parts_of(s3_server, f"{s3_dir}/sized.data-00000-of-00001") == [7 * MiB, big.nbytes - 7 * MiB]


def test_saver_with_a_bad_option_fails_naming_it(s3_server, s3_dir):
    ss.Variable("v", np.zeros(3, np.float32))
    saver = ss.Saver(storage_options={**s3_server.options(), "upload_concurrency": 0})
    with pytest.raises(InvalidArgumentError, match="upload_concurrency=0"):
        saver.save(f"{s3_dir}/m")


def test_other_options_still_reach_s3fs(s3_server, s3_dir):
    options = {**s3_server.options(), "upload_part_size": 6 * MiB, "max_concurrency": 3}
    loc = storage.resolve(f"{s3_dir}/a.bin", options)
    assert loc.is_s3 and loc.fs.endpoint_url == s3_server.endpoint
    assert loc.fs.max_concurrency == 3  # s3fs's own option, not shardsave's
    assert "upload_part_size" not in loc.fs.storage_options
    assert loc.backend.part_size == 6 * MiB and loc.backend.concurrency is None
    assert loc.child("b").backend is loc.backend and loc.parent.backend is loc.backend
    upload(loc, np.arange(13 * MiB, dtype=np.uint64).view(np.uint8)[: 13 * MiB])
    assert parts_of(s3_server, f"{s3_dir}/a.bin") == [6 * MiB, 6 * MiB, 1 * MiB]
    # the same filesystem object as without the options (fsspec caches it by its options)
    assert storage.resolve(s3_dir, {**s3_server.options(), "max_concurrency": 3}).fs is loc.fs
    assert storage.resolve(s3_dir, s3_server.options()).backend is s3.BACKEND
    # a ready fs takes shardsave's options alone, not fsspec's
    ready = storage.resolve(f"{s3_dir}/a.bin", {"upload_concurrency": 2}, fs=loc.fs)
    assert ready.backend.concurrency == 2 and ready.backend.part_size is None
    with pytest.raises(InvalidArgumentError, match="either fs or storage_options"):
        storage.resolve(s3_dir, {"endpoint_url": s3_server.endpoint}, fs=loc.fs)
    # a Location crosses processes with its options
    again = pickle.loads(pickle.dumps(ready))
    assert (again.backend.part_size, again.backend.concurrency) == (None, 2)
    assert pickle.loads(pickle.dumps(storage.resolve(s3_dir, s3_server.options()))).backend is s3.BACKEND
