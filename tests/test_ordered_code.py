"""Tests of shardsave.format.ordered_code (TF's OrderedCode / tensor slice keys)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardsave.format.ordered_code import (
    decode_slice_key,
    encode_slice_key,
    read_num_increasing,
    read_signed_num_increasing,
    read_string,
    write_num_increasing,
    write_signed_num_increasing,
    write_string,
)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
DATA = Path(__file__).parent / "data" / "tf"

int64s = st.integers(INT64_MIN, INT64_MAX)
uint64s = st.integers(0, UINT64_MAX)
# Values at and next to every encoding-length boundary, which random draws rarely hit.
BOUNDARIES = sorted(
    {
        v
        for k in range(64)
        for b in (1 << k, -(1 << k))
        for v in (b - 1, b, b + 1)
        if INT64_MIN <= v <= INT64_MAX
    }
    | {INT64_MIN, INT64_MAX}
)
int64s_with_edges = st.one_of(int64s, st.sampled_from(BOUNDARIES))
uint64s_with_edges = st.one_of(uint64s, st.sampled_from([v for v in BOUNDARIES if v >= 0] + [UINT64_MAX]))


# --------------------------------------------------------------------------------------
# Expected encodings, taken from TF's tensorflow/core/lib/strings/ordered_code_test.cc
# (EncodingIsExpected.{Unsigned,Signed,String}).

UNSIGNED_VECTORS = [
    (0, b"\x00"),
    (1, b"\x01\x01"),
    (0xFF, b"\x01\xff"),
    (0x100, b"\x02\x01\x00"),
    (0xFFFF, b"\x02\xff\xff"),
    (0x10000, b"\x03\x01\x00\x00"),
    (0x7FFFFFFFFFFFFFFF, b"\x08\x7f" + b"\xff" * 7),
    (0x8000000000000001, b"\x08\x80" + b"\x00" * 6 + b"\x01"),
    (UINT64_MAX, b"\x08" + b"\xff" * 8),
]

SIGNED_VECTORS = [
    (0, b"\x80"),
    (1, b"\x81"),
    (4, b"\x84"),
    (63, b"\xbf"),
    (64, b"\xc0@"),
    (255, b"\xc0\xff"),
    (256, b"\xc1\x00"),
    (8191, b"\xdf\xff"),
    (8192, b"\xe0 \x00"),
    (1048575, b"\xef\xff\xff"),
    (1048576, b"\xf0\x10\x00\x00"),
    (134217728, b"\xf8\x08\x00\x00\x00"),
    (17179869184, b"\xfc\x04\x00\x00\x00\x00"),
    (2199023255552, b"\xfe\x02\x00\x00\x00\x00\x00"),
    (281474976710656, b"\xff\x01\x00\x00\x00\x00\x00\x00"),
    (36028797018963967, b"\xff\x7f" + b"\xff" * 6),
    (36028797018963968, b"\xff\x80\x80" + b"\x00" * 6),
    (4611686018427387903, b"\xff\xbf" + b"\xff" * 7),
    (4611686018427387904, b"\xff\xc0@" + b"\x00" * 7),
    (INT64_MAX, b"\xff\xc0\x7f" + b"\xff" * 7),
    (-1, b"\x7f"),
    (-2, b"~"),
    (-64, b"@"),
    (-65, b"?\xbf"),
    (-256, b"?\x00"),
    (-8192, b" \x00"),
    (-8193, b"\x1f\xdf\xff"),
    (-1048576, b"\x10\x00\x00"),
    (-1048577, b"\x0f\xef\xff\xff"),
    (-134217729, b"\x07\xf7\xff\xff\xff"),
    (-17179869185, b"\x03\xfb\xff\xff\xff\xff"),
    (-2199023255553, b"\x01\xfd\xff\xff\xff\xff\xff"),
    (-281474976710657, b"\x00\xfe" + b"\xff" * 6),
    (-36028797018963968, b"\x00\x80" + b"\x00" * 6),
    (-36028797018963969, b"\x00\x7f\x7f" + b"\xff" * 6),
    (-4611686018427387904, b"\x00@" + b"\x00" * 7),
    (-4611686018427387905, b"\x00?\xbf" + b"\xff" * 7),
    (-9223372036854775807, b"\x00?\x80" + b"\x00" * 6 + b"\x01"),
    (INT64_MIN, b"\x00?\x80" + b"\x00" * 7),  # derived from the C++ by hand
]

STRING_VECTORS = [
    (b"", b"\x00\x01"),
    (b"foo", b"foo\x00\x01"),
    (b"\x00\x01\xff", b"\x00\xff\x01\xff\x00\x00\x01"),
    (b"\xff\xfe", b"\xff\x00\xfe\x00\x01"),
]


@pytest.mark.parametrize(("value", "encoded"), UNSIGNED_VECTORS)
def test_unsigned_vectors(value: int, encoded: bytes) -> None:
    assert write_num_increasing(value) == encoded
    assert read_num_increasing(encoded, 0) == (value, len(encoded))


@pytest.mark.parametrize(("value", "encoded"), SIGNED_VECTORS)
def test_signed_vectors(value: int, encoded: bytes) -> None:
    assert write_signed_num_increasing(value) == encoded
    assert read_signed_num_increasing(encoded, 0) == (value, len(encoded))


@pytest.mark.parametrize(("value", "encoded"), STRING_VECTORS)
def test_string_vectors(value: bytes, encoded: bytes) -> None:
    assert write_string(value) == encoded
    assert read_string(encoded, 0) == (value, len(encoded))


def test_format_md_example() -> None:
    key = encode_slice_key("emb", [(0, 4), (0, 4)])
    assert key == bytes.fromhex("00 656d62 0001 0102 8084 8084")
    assert decode_slice_key(key) == ("emb", [(0, 4), (0, 4)])


def test_whole_dimension_and_read_at_offset() -> None:
    key = encode_slice_key("a/b", [(5, 3), (0, -1)])
    assert key == b"\x00a/b\x00\x01\x01\x02\x85\x83\x80\x7f"
    assert decode_slice_key(key) == ("a/b", [(5, 3), (0, -1)])
    buf = b"junk" + write_signed_num_increasing(-70000) + write_string(b"\x00z")
    value, pos = read_signed_num_increasing(buf, 4)
    assert value == -70000
    assert read_string(buf, pos) == (b"\x00z", len(buf))


# --------------------------------------------------------------------------------------
# A line-by-line port of TF's C++ (uint64 arithmetic and its lookup tables), used as a
# differential oracle for the signed encoding.

_M64 = (1 << 64) - 1
_TF_HEADER = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0), (0xFC, 0),
              (0xFE, 0), (0xFF, 0), (0xFF, 0x80), (0xFF, 0xC0)]  # fmt: skip
_TF_MASK = [0, 0x80, 0xC000, 0xE00000, 0xF0000000, 0xF800000000, 0xFC0000000000,
            0xFE000000000000, 0xFF00000000000000, 0x8000000000000000, 0]  # fmt: skip
# fmt: off
_TF_BITS_TO_LENGTH = [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4,
                      4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 7,
                      7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 10]
# fmt: on


def _log2floor(x: int) -> int:
    return x.bit_length() - 1  # -1 for 0, as tsl::Log2Floor64


def _tf_write_signed(val: int) -> bytes:
    x = (~val if val < 0 else val) & _M64
    if x < 64:
        return bytes([(0x80 ^ val) & 0xFF])
    sign = 0xFF if val < 0 else 0
    buf = bytearray([sign, sign]) + (val & _M64).to_bytes(8, "big")
    length = _TF_BITS_TO_LENGTH[_log2floor(x) + 1]
    begin = 10 - length
    buf[begin] ^= _TF_HEADER[length][0]
    buf[begin + 1] ^= _TF_HEADER[length][1]
    return bytes(buf[begin:])


def _tf_read_signed(src: bytes) -> tuple[int, int] | None:
    if not src:
        return None
    xor_mask = _M64 if not src[0] & 0x80 else 0
    first = src[0] ^ (xor_mask & 0xFF)
    if first != 0xFF:
        length = 7 - _log2floor(first ^ 0xFF)
        if len(src) < length:
            return None
        x = xor_mask
        for i in range(length):
            x = ((x << 8) | src[i]) & _M64
    else:
        length = 8
        if len(src) < length:
            return None
        second = src[1] ^ (xor_mask & 0xFF)
        if second >= 0x80:
            if second < 0xC0:
                length = 9
            else:
                third = src[2] ^ (xor_mask & 0xFF)
                if second == 0xC0 and third < 0x80:
                    length = 10
                else:
                    return None
            if len(src) < length:
                return None
        x = int.from_bytes(src[length - 8 : length], "big")
    x ^= _TF_MASK[length]
    return (x - (1 << 64) if x >> 63 else x), length


@given(int64s_with_edges)
def test_signed_matches_tf_reference(v: int) -> None:
    enc = write_signed_num_increasing(v)
    assert enc == _tf_write_signed(v)
    assert _tf_read_signed(enc) == (v, len(enc))


@given(st.binary(min_size=1, max_size=12))
def test_signed_reader_agrees_with_tf_on_arbitrary_bytes(buf: bytes) -> None:
    """Where TF accepts canonical input we return the same; we never accept more."""
    want = _tf_read_signed(buf)
    try:
        got = read_signed_num_increasing(buf, 0)
    except ValueError:
        # We also reject non-minimal encodings (a DCHECK in TF's debug builds).
        if want is not None:
            value, length = want
            assert write_signed_num_increasing(value) != buf[:length]
        return
    assert got == want


# --------------------------------------------------------------------------------------
# Properties.


@given(uint64s_with_edges)
def test_unsigned_round_trip(n: int) -> None:
    enc = write_num_increasing(n)
    assert read_num_increasing(enc + b"tail", 0) == (n, len(enc))


@given(int64s_with_edges)
def test_signed_round_trip(v: int) -> None:
    enc = write_signed_num_increasing(v)
    assert 1 <= len(enc) <= 10
    assert read_signed_num_increasing(enc + b"\x00tail", 0) == (v, len(enc))


@given(st.binary())
def test_string_round_trip(s: bytes) -> None:
    enc = write_string(s)
    assert read_string(enc + b"\xff\x00tail", 0) == (s, len(enc))


@given(uint64s_with_edges, uint64s_with_edges)
def test_unsigned_order(a: int, b: int) -> None:
    ea, eb = write_num_increasing(a), write_num_increasing(b)
    assert (a < b) == (ea < eb) and (a == b) == (ea == eb)


@given(int64s_with_edges, int64s_with_edges)
def test_signed_order(a: int, b: int) -> None:
    ea, eb = write_signed_num_increasing(a), write_signed_num_increasing(b)
    assert (a < b) == (ea < eb) and (a == b) == (ea == eb)


@given(st.binary(), st.binary())
def test_string_order(a: bytes, b: bytes) -> None:
    ea, eb = write_string(a), write_string(b)
    assert (a < b) == (ea < eb) and (a == b) == (ea == eb)


def test_boundary_order() -> None:
    signed = [write_signed_num_increasing(v) for v in BOUNDARIES]
    assert signed == sorted(signed)
    unsigned = [write_num_increasing(v) for v in BOUNDARIES if v >= 0]
    assert unsigned == sorted(unsigned)


extents = st.lists(
    st.one_of(
        st.just((0, -1)),
        st.tuples(st.integers(0, INT64_MAX), st.integers(0, INT64_MAX)),
    ),
    min_size=1,
    max_size=6,
)


@given(st.text(), extents)
def test_slice_key_round_trip(name: str, ext: list[tuple[int, int]]) -> None:
    key = encode_slice_key(name, ext)
    assert key[0] == 0  # sorts before every ordinary (non-empty, UTF-8) name
    assert decode_slice_key(key) == (name, ext)


@given(st.binary(max_size=40))
def test_decode_garbage_raises_only_value_error(key: bytes) -> None:
    try:
        name, ext = decode_slice_key(key)
    except ValueError:
        return
    assert encode_slice_key(name, ext) == key


# --------------------------------------------------------------------------------------
# Malformed input.


@pytest.mark.parametrize(("value", "encoded"), [*SIGNED_VECTORS, (None, b"")])
def test_signed_truncated(value: int | None, encoded: bytes) -> None:
    for i in range(len(encoded)):
        with pytest.raises(ValueError):
            read_signed_num_increasing(encoded[:i], 0)


def test_invalid_numbers() -> None:
    too_big = b"\xff\xc0\x80" + bytes(7)  # 2**63, from TF's Overflow test
    for bad in (too_big, bytes(~c & 0xFF for c in too_big), b"\xff\xff" + bytes(9)):
        with pytest.raises(ValueError):
            read_signed_num_increasing(bad, 0)
    with pytest.raises(ValueError, match="non-minimal"):
        read_signed_num_increasing(b"\xc0\x01", 0)  # 1 in two bytes
    for bad in (b"\x09\x01" + bytes(8), b"\x02\x00\x01", b"\x02\x01", b""):
        with pytest.raises(ValueError):
            read_num_increasing(bad, 0)
    for bad in (b"abc", b"abc\x00", b"a\x00\x02", b"a\xff\x01\x00\x01", b"\xff"):
        with pytest.raises(ValueError):
            read_string(bad, 0)
    for v in (INT64_MAX + 1, INT64_MIN - 1):
        with pytest.raises(ValueError):
            write_signed_num_increasing(v)
    for n in (-1, UINT64_MAX + 1):
        with pytest.raises(ValueError):
            write_num_increasing(n)


GOOD_KEY = encode_slice_key("emb", [(0, 4), (0, -1)])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (b"", "truncated"),
        (b"\x01\x01" + GOOD_KEY[1:], "leading number"),
        (b"\x00emb", "unterminated"),
        (b"\x00emb\x00\x02\x01\x02", "invalid escape"),
        (b"\x00emb\x00\x01\x00", "rank"),
        # the largest rank, INT32_MAX - 1, passes the rank check (and lacks its extents)
        (b"\x00emb\x00\x01" + write_num_increasing((1 << 31) - 2), "truncated"),
        (b"\x00emb\x00\x01" + write_num_increasing((1 << 31) - 1), r"below 2\*\*31-1, got 2147483647"),
        (b"\x00emb\x00\x01", "truncated"),
        (GOOD_KEY[:-1], "truncated"),
        (GOOD_KEY + b"\x80", "trailing"),
        (b"\x00\xc3\x00\x01\x01\x01\x80\x81", "utf-8"),
        (b"\x00e\x00\x01\x01\x01\x7f\x81", "bad extent"),  # start -1
        (b"\x00e\x00\x01\x01\x01\x81\x7f", "bad extent"),  # (1, -1)
    ],
)
def test_decode_malformed(key: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=f"(?i)malformed tensor slice key.*{message}"):
        decode_slice_key(key)


@pytest.mark.parametrize("ext", [[], [(-1, 2)], [(0, -2)], [(3, -1)], [(0, 1 << 63)]])
def test_encode_rejects(ext: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        encode_slice_key("x", ext)


# --------------------------------------------------------------------------------------
# Real index files: a minimal LevelDB table reader (test helper, per FORMAT.md).


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
    out: list[tuple[bytes, bytes]] = []
    pos, key = 0, b""
    while pos < limit:
        start = pos
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        assert start not in restarts or shared == 0
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        out.append((key, block[pos : pos + vlen]))
        pos += vlen
    assert pos == limit
    return out


def read_index(path: Path) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a tensor-bundle .index file, in file order."""
    data = path.read_bytes()
    footer = data[-48:]
    assert footer[-8:] == bytes.fromhex("57fb808b247547db")
    _, p = _varint(footer, 0)  # metaindex handle
    _, p = _varint(footer, p)
    index_off, p = _varint(footer, p)
    index_size, p = _varint(footer, p)
    entries: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(data[index_off : index_off + index_size]):
        off, p = _varint(handle, 0)
        size, p = _varint(handle, p)
        assert data[off + size] == 0, "compressed block"
        entries.extend(_block_entries(data[off : off + size]))
    keys = [k for k, _ in entries]
    assert keys == sorted(set(keys)) and keys[0] == b""
    return entries


def _slice_keys(path: Path) -> list[bytes]:
    return [k for k, _ in read_index(path) if k[:1] == b"\x00"]


def test_golden_partitioned_keys() -> None:
    """Key bytes of tests/data/tf/partitioned (written by TF), no TF needed."""
    index = DATA / "partitioned" / "model.ckpt.index"
    if not index.exists():
        pytest.skip("golden files not generated")
    keys = _slice_keys(index)
    assert [decode_slice_key(k) for k in keys] == [
        ("emb", [(0, 4), (0, 4)]),
        ("emb", [(4, 3), (0, 4)]),
        ("emb", [(7, 3), (0, 4)]),
        ("wide", [(0, 4), (0, 5)]),
        ("wide", [(0, 4), (5, 4)]),
    ]
    assert keys[1] == bytes.fromhex("00 656d62 0001 0102 8483 8084")
    assert all(encode_slice_key(*decode_slice_key(k)) == k for k in keys)


def _full_entry_extents(value: bytes) -> list[list[tuple[int, int]]]:
    from tensorflow.core.protobuf import tensor_bundle_pb2

    entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
    return [
        [(e.start, e.length) if e.HasField("length") else (0, -1) for e in s.extent] for s in entry.slices
    ]


def _check_against_tf_index(index: Path) -> dict[str, set[tuple]]:
    """Every slice key round-trips and matches the slices of its full entry."""
    entries = read_index(index)
    from_keys: dict[str, set[tuple]] = {}
    for key, _ in entries:
        if key[:1] == b"\x00":
            name, ext = decode_slice_key(key)
            assert encode_slice_key(name, ext) == key
            from_keys.setdefault(name, set()).add(tuple(ext))
    from_entries = {
        k.decode(): {tuple(e) for e in _full_entry_extents(v)}
        for k, v in entries
        if k and k[:1] != b"\x00" and _full_entry_extents(v)
    }
    assert from_keys == from_entries
    return from_keys


def test_tf_partitioned_variables(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    v1 = tf.compat.v1
    expected: dict[str, set[tuple]] = {}
    graph = tf.Graph()
    with graph.as_default():
        specs = [
            ("emb", [10, 4], v1.fixed_size_partitioner(3)),
            ("mid", [200, 5], v1.fixed_size_partitioner(3)),  # offsets 67, 134
            ("big", [30000, 3], v1.fixed_size_partitioner(3)),  # 10000, 20000
            ("cols", [3, 20000], lambda shape, dtype: [1, 4]),  # axis 1
            ("wide", [4, 9], lambda shape, dtype: [1, 2]),  # TF allows one axis only
            ("scope/v", [5], v1.fixed_size_partitioner(2)),
        ]
        for name, shape, partitioner in specs:
            var = v1.get_variable(name, shape, tf.int8, v1.zeros_initializer(), partitioner=partitioner)
            for part in var:
                info = part._save_slice_info
                expected.setdefault(name, set()).add(tuple(zip(info.var_offset, info.var_shape, strict=True)))
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "ck"), write_meta_graph=False)
    assert ((0, 4), (5, 4)) in expected["wide"]
    assert ((10000, 10000), (0, 3)) in expected["big"]
    assert _check_against_tf_index(Path(prefix + ".index")) == expected


def test_tf_raw_slices_with_huge_offsets(tmp_path: Path) -> None:
    """SaveV2 with explicit slice specs: offsets up to 2**62, whole dimensions ('-')."""
    tf = pytest.importorskip("tensorflow")
    big = 1 << 62
    cases = {
        "a": (f"{big} {big - 1},1", [(big - 1, 1)]),
        "b": ("3000000000 2999999999,1", [(2999999999, 1)]),
        "c": ("2000000 1048576,2", [(1048576, 2)]),
        "d": ("10 4 0,4:-", [(0, 4), (0, -1)]),
        "e": ("70000 3 65536,1:-", [(65536, 1), (0, -1)]),
        "f": ("9 70 3,3:35,35", [(3, 3), (35, 35)]),  # sliced along both axes
        "n\x00\u00e9/\u2603": ("5 1,2", [(1, 2)]),  # escaped 0x00, non-ASCII
    }
    prefix = str(tmp_path / "raw")
    tensors = []
    for spec, ext in cases.values():
        shape = [n if n >= 0 else int(spec.split()[d]) for d, (_, n) in enumerate(ext)]
        tensors.append(tf.zeros(shape, tf.float32))
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveV2(
            prefix=prefix,
            tensor_names=[name.encode() for name in cases],
            shape_and_slices=[spec for spec, _ in cases.values()],
            tensors=tensors,
        )
    got = _check_against_tf_index(Path(prefix + ".index"))
    assert got == {name: {tuple(ext)} for name, (_, ext) in cases.items()}
    keys = _slice_keys(Path(prefix + ".index"))
    assert encode_slice_key("a", [(big - 1, 1)]) in keys
    assert len(write_signed_num_increasing(big - 1)) == 9
