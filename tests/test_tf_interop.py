"""TensorFlow as the oracle of the format, both ways.

shardsave writes -> TensorFlow reads (load_variable, list_variables, NewCheckpointReader,
Saver.restore in graph mode, latest_checkpoint, inspect_checkpoint), and TensorFlow
writes -> shardsave reads (the golden files under tests/data/tf and fresh ones), every
value compared bit for bit (floats as unsigned ints, so NaN payloads and -0.0 count).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import shardsave as ss

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
inspect_checkpoint = pytest.importorskip("tensorflow.python.tools.inspect_checkpoint")

pytestmark = pytest.mark.tf

v1 = tf.compat.v1
DATA = Path(__file__).parent / "data" / "tf"
CHECKSUM_BLOCK = 64 * 1024


# ----------------------------------------------------------------------------- helpers
def _random_bits(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    """Random bit patterns of ``dtype`` (NaNs with payloads, subnormals, -0.0 included)."""
    dtype = np.dtype(dtype)
    unit = np.dtype(f"u{min(dtype.itemsize, 8)}")
    count = math.prod(shape) * (dtype.itemsize // unit.itemsize)
    raw = rng.integers(0, np.iinfo(unit).max, size=count, dtype=unit, endpoint=True)
    return raw.view(dtype).reshape(shape)


def _float_value(rng, dtype, shape=(3, 4)) -> np.ndarray:
    out = _random_bits(rng, dtype, shape).copy()
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0]
    if np.dtype(dtype) == np.dtype(ml_dtypes.float8_e4m3fn):
        specials = [0.0, -0.0, 448.0, -448.0, np.nan, 1.0]  # no infinities
    out.flat[: len(specials)] = np.array(specials, dtype=np.float32).astype(dtype)
    return out


def _int_value(dtype, shape=(3, 4)) -> np.ndarray:
    info = np.iinfo(dtype)
    out = (np.arange(math.prod(shape), dtype=np.int64) * 37 - 100).astype(dtype).reshape(shape)
    out.flat[0], out.flat[-1] = info.min, info.max
    return out


def make_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    values: dict[str, np.ndarray] = {}
    for dt in (
        np.float16,
        np.float32,
        np.float64,
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e4m3fn,
    ):
        values[f"dt_{np.dtype(dt).name}"] = _float_value(rng, dt)
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        values[f"dt_{np.dtype(dt).name}"] = _int_value(dt)
    values["dt_bool"] = rng.integers(0, 2, size=(3, 4)).astype(bool)
    values["dt_complex64"] = _random_bits(rng, np.complex64, (3, 4))
    values["dt_complex128"] = _random_bits(rng, np.complex128, (2, 5))
    values["dt_complex128"].flat[0] = complex(-0.0, np.nan)
    values["scalar"] = np.array(-0.0, dtype=np.float64)
    values["scalar_int"] = np.array(-7, dtype=np.int32)
    values["empty"] = np.zeros((0, 3), dtype=np.float32)
    values["strings"] = np.array(
        [[b"hi", b"", b"\x00\xff"], [b"x" * 300, "t\u00e9nsor".encode(), b"\n"]], dtype=object
    )
    values["scalar_string"] = np.array(b"just one", dtype=object)
    values["nested/scope/big"] = _random_bits(rng, np.float32, (250, 400))  # 400 kB > 64 KiB
    return values


VALUES = make_values()
EMB = np.arange(40, dtype=np.float32).reshape(10, 4) * 0.5 - 3.0
PART = "part/emb"


def assert_bits_equal(actual, expected, what="", *, tf_read=False) -> None:
    """Same shape, dtype and bits. TF hands out a scalar string as bytes (``tf_read``)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.dtype == object:
        assert actual.dtype == object or (tf_read and actual.dtype.kind == "S"), (what, actual.dtype)
        assert [bytes(x) for x in actual.reshape(-1)] == [bytes(x) for x in expected.reshape(-1)], what
        return
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    unit = np.dtype(f"u{min(expected.dtype.itemsize, 8)}")
    a = np.ascontiguousarray(actual).reshape(-1).view(unit)
    e = np.ascontiguousarray(expected).reshape(-1).view(unit)
    np.testing.assert_array_equal(a, e, err_msg=what)


def _tf_dtype(arr: np.ndarray):
    return tf.string if arr.dtype == object else tf.as_dtype(arr.dtype)


def _np_dtype(tf_dtype) -> np.dtype:
    return np.dtype(object) if tf_dtype == tf.string else np.dtype(tf_dtype.as_numpy_dtype)


# ------------------------------------------------------------- shardsave writes, TF reads
@pytest.fixture(scope="module")
def ss_ckpt(tmp_path_factory):
    """Three saves with max_to_keep=2: model.ckpt-1 is deleted, -2 and -3 stay."""
    directory = tmp_path_factory.mktemp("ss_written")
    graph = ss.Graph()
    with graph.as_default():
        for name, value in VALUES.items():
            ss.Variable(name, value)
        ss.get_variable(PART, shape=[10, 4], initializer=EMB, partitioner=ss.fixed_size_partitioner(3))
        saver = ss.Saver(max_to_keep=2)
        prefixes = [saver.save(str(directory / "model.ckpt"), global_step=step) for step in (1, 2, 3)]
    return {"dir": str(directory), "prefix": prefixes[-1], "prefixes": prefixes}


def test_shardsave_wrote_block_checksums_and_pieces(ss_ckpt):
    """The fixture does exercise the extension fields and sliced entries TF must skip."""
    reader = ss.CheckpointReader(ss_ckpt["prefix"])
    index = reader.get_entries()
    big = index.entries["nested/scope/big"]
    assert big.size == 400_000
    assert big.block_size == CHECKSUM_BLOCK
    assert len(big.block_crcs) == 4 * math.ceil(400_000 / CHECKSUM_BLOCK)
    assert len(index.pieces[PART]) == 3
    assert len(index.entries[PART].slices) == 3


@pytest.mark.parametrize("name", sorted(VALUES))
def test_tf_load_variable(ss_ckpt, name):
    assert_bits_equal(tf.train.load_variable(ss_ckpt["prefix"], name), VALUES[name], name, tf_read=True)


def test_tf_load_variable_through_directory(ss_ckpt):
    assert_bits_equal(tf.train.load_variable(ss_ckpt["dir"], "dt_float32"), VALUES["dt_float32"])


def test_tf_list_variables(ss_ckpt):
    expected = sorted([(n, list(v.shape)) for n, v in VALUES.items()] + [(PART, [10, 4])])
    assert sorted((n, list(s)) for n, s in tf.train.list_variables(ss_ckpt["prefix"])) == expected


def test_tf_new_checkpoint_reader(ss_ckpt):
    reader = v1.train.NewCheckpointReader(ss_ckpt["prefix"])
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    assert set(shapes) == set(VALUES) | {PART}
    for name, value in VALUES.items():
        assert reader.has_tensor(name)
        assert shapes[name] == list(value.shape), name
        assert _np_dtype(dtypes[name]) == value.dtype, name
        assert_bits_equal(reader.get_tensor(name), value, name, tf_read=True)
    assert shapes[PART] == [10, 4]
    assert dtypes[PART] == tf.float32
    assert_bits_equal(reader.get_tensor(PART), EMB)


def test_tf_saver_restores_into_graph_variables(ss_ckpt):
    graph = tf.Graph()
    with graph.as_default():
        variables = {
            name: v1.Variable(
                np.zeros_like(value) if value.dtype != object else np.full(value.shape, b"?", object),
                dtype=_tf_dtype(value),
                name="restored_" + name.replace("/", "_"),
            )
            for name, value in VALUES.items()
        }
        saver = v1.train.Saver(var_list=variables)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            saver.restore(sess, ss_ckpt["prefix"])
            got = sess.run(variables)
    for name, value in VALUES.items():
        assert_bits_equal(got[name], value, name, tf_read=True)


@pytest.mark.parametrize("num_parts", [3, 2, 1])
def test_tf_saver_restores_shardsave_partitioned_variable(ss_ckpt, num_parts):
    """3 parts as saved, and 2 / 1: TF re-slices the shardsave pieces itself."""
    graph = tf.Graph()
    with graph.as_default():
        pv = v1.get_variable(
            PART,
            shape=[10, 4],
            dtype=tf.float32,
            initializer=v1.zeros_initializer(),
            partitioner=v1.fixed_size_partitioner(num_parts),
        )
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            saver.restore(sess, ss_ckpt["prefix"])
            got = sess.run(tf.convert_to_tensor(pv))
    assert_bits_equal(got, EMB)


def test_tf_latest_checkpoint_reads_shardsave_state_file(ss_ckpt):
    directory, prefixes = ss_ckpt["dir"], ss_ckpt["prefixes"]
    assert tf.train.latest_checkpoint(directory) == prefixes[2]
    state = tf.train.get_checkpoint_state(directory)
    assert state.model_checkpoint_path == prefixes[2]
    assert list(state.all_model_checkpoint_paths) == prefixes[1:]
    assert not os.path.exists(prefixes[0] + ".index")
    assert not os.path.exists(prefixes[0] + ".data-00000-of-00001")
    assert os.path.exists(prefixes[1] + ".index")


def test_tf_inspect_checkpoint_prints_everything(ss_ckpt, capsys):
    inspect_checkpoint.print_tensors_in_checkpoint_file(ss_ckpt["prefix"], tensor_name="", all_tensors=True)
    out = capsys.readouterr().out
    for name in list(VALUES) + [PART]:
        assert f"tensor: {name} ({_tf_dtype(VALUES.get(name, EMB)).name}) " in out, name
    total = sum(v.size for v in VALUES.values()) + EMB.size
    assert f"# Total number of params: {total}" in out

    inspect_checkpoint.print_tensors_in_checkpoint_file(
        ss_ckpt["prefix"], tensor_name="dt_int8", all_tensors=False
    )
    out = capsys.readouterr().out
    assert "tensor: dt_int8 (int8) [3, 4]" in out, out
    assert str(VALUES["dt_int8"]) in out

    inspect_checkpoint.print_tensors_in_checkpoint_file(ss_ckpt["prefix"], tensor_name="", all_tensors=False)
    out = capsys.readouterr().out  # the reader's debug string: one line per tensor
    assert "dt_uint64 (DT_UINT64) [3,4]" in out
    assert "nested/scope/big (DT_FLOAT) [250,400]" in out
    assert out.count(f"\x00{PART}\x00") == 3  # TF's debug string shows the 3 pieces' keys


def test_shardsave_partial_read_of_big_tensor_reads_only_needed_blocks(ss_ckpt):
    reader = ss.CheckpointReader(ss_ckpt["prefix"])
    got = reader.get_slice("nested/scope/big", (slice(100, 102), slice(None)))
    assert_bits_equal(got, VALUES["nested/scope/big"][100:102])
    assert 0 < reader.bytes_read <= 2 * CHECKSUM_BLOCK


# ------------------------------------------------------------- TF writes, shardsave reads
EXPECTED = json.loads((DATA / "expected.json").read_text())["tensors"]


@pytest.fixture(scope="module")
def expected_npz():
    with np.load(DATA / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def _expected(key: str, npz: dict) -> np.ndarray:
    meta = EXPECTED[key]
    if meta["dtype"] == "string":
        return np.array([bytes.fromhex(h) for h in meta["hex"]], dtype=object).reshape(meta["shape"])
    arr = npz[key]
    if meta["dtype"] in ("bfloat16", "float8_e5m2", "float8_e4m3fn"):
        arr = arr.view(getattr(ml_dtypes, meta["dtype"]))
    return arr


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_golden_tensor_bit_exact(key, expected_npz):
    directory, name = key.split("/", 1)
    prefix = ss.latest_checkpoint(str(DATA / directory))
    assert prefix == tf.train.latest_checkpoint(str(DATA / directory))
    assert os.path.exists(prefix + ".index")
    want = _expected(key, expected_npz)
    meta = EXPECTED[key]
    assert list(want.shape) == meta["shape"]
    assert_bits_equal(ss.load_variable(prefix, name), want, key)
    reader = ss.CheckpointReader(prefix)
    assert reader.get_variable_to_shape_map()[name] == meta["shape"]
    dtype = reader.get_variable_to_dtype_map()[name]
    assert dtype == (np.dtype(object) if meta["dtype"] == "string" else want.dtype)


@pytest.mark.parametrize("directory", ["v1_saver", "partitioned", "sharded", "object", "float8"])
def test_golden_list_variables(directory):
    want = sorted(
        (k.split("/", 1)[1], v["shape"]) for k, v in EXPECTED.items() if k.startswith(directory + "/")
    )
    assert ss.list_variables(str(DATA / directory)) == want


def test_golden_sharded_checkpoint_has_two_data_files():
    reader = ss.CheckpointReader(str(DATA / "sharded" / "model.ckpt"))
    assert reader.num_shards == 2
    assert {e.shard_id for e in reader.get_entries().entries.values()} == {0, 1}


def test_golden_partitioned_pieces_and_slices(expected_npz):
    reader = ss.CheckpointReader(str(DATA / "partitioned" / "model.ckpt"))
    index = reader.get_entries()
    assert len(index.pieces["emb"]) == 3 and len(index.pieces["wide"]) == 2
    emb = _expected("partitioned/emb", expected_npz)
    wide = _expected("partitioned/wide", expected_npz)
    assert_bits_equal(reader.get_slice("emb", slice(2, 8)), emb[2:8])
    assert_bits_equal(reader.get_slice("wide", (slice(1, 3), slice(3, 7))), wide[1:3, 3:7])
    assert_bits_equal(reader.get_slice("wide", (2, slice(None))), wide[2])


def test_golden_restore_into_shardsave_variables(expected_npz):
    """Saver.restore of every v1_saver tensor into uninitialized shardsave variables."""
    keys = [k for k in EXPECTED if k.startswith("v1_saver/")]
    with ss.Graph().as_default():
        variables = {}
        for key in keys:
            want = _expected(key, expected_npz)
            variables[key] = ss.get_variable(key.split("/", 1)[1], shape=want.shape, dtype=want.dtype)
        ss.Saver().restore(str(DATA / "v1_saver" / "model.ckpt"))
    for key, var in variables.items():
        assert_bits_equal(var.value, _expected(key, expected_npz), key)


TF_VALUES = {
    "w": VALUES["dt_float32"],
    "half": VALUES["dt_float16"],
    "bf": VALUES["dt_bfloat16"],
    "cplx": VALUES["dt_complex128"],
    "u64": VALUES["dt_uint64"],
    "flag": VALUES["dt_bool"],
    "step": np.array(12345678901, dtype=np.int64),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "text": np.array([b"alpha", b"", b"\xff" * 200], dtype=object),
}
WIDE = (np.arange(36, dtype=np.int64).reshape(4, 9) - 10) * 1000


def _part_init(full: np.ndarray):
    def init(shape, dtype=None, partition_info=None):
        if partition_info is None:
            return tf.constant(full)
        index = tuple(slice(o, o + n) for o, n in zip(partition_info.var_offset, shape, strict=True))
        return tf.constant(full[index])

    return init


@pytest.fixture(scope="module")
def tf_ckpt(tmp_path_factory):
    """Graph-mode tf.compat.v1 Saver, max_to_keep=2, steps 1..3 (step k: w += k)."""
    directory = tmp_path_factory.mktemp("tf_written")
    graph = tf.Graph()
    with graph.as_default():
        variables = {
            n: v1.get_variable(n, initializer=tf.constant(v, dtype=_tf_dtype(v)))
            for n, v in TF_VALUES.items()
        }
        v1.get_variable(
            "emb",
            shape=[10, 4],
            dtype=tf.float32,
            initializer=_part_init(EMB),
            partitioner=v1.fixed_size_partitioner(3),
        )
        v1.get_variable(
            "wide",
            shape=[4, 9],
            dtype=tf.int64,
            initializer=_part_init(WIDE),
            partitioner=lambda shape, dtype: [1, 2],
        )
        bump = variables["u64"].assign_add(tf.ones([3, 4], dtype=tf.uint64))
        saver = v1.train.Saver(max_to_keep=2)
        prefixes = []
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            for step in (1, 2, 3):
                if step > 1:
                    sess.run(bump)
                prefixes.append(
                    saver.save(sess, str(directory / "model.ckpt"), global_step=step, write_meta_graph=False)
                )
    values = dict(TF_VALUES, emb=EMB, wide=WIDE)
    values["u64"] = (TF_VALUES["u64"] + np.uint64(2)).astype(np.uint64)  # wraps like TF
    return {"dir": str(directory), "prefixes": prefixes, "prefix": prefixes[-1], "values": values}


def test_tf_written_latest_checkpoint_and_state(tf_ckpt):
    directory, prefixes = tf_ckpt["dir"], tf_ckpt["prefixes"]
    assert ss.latest_checkpoint(directory) == prefixes[2]
    state = ss.get_checkpoint_state(directory)
    assert state.model_checkpoint_path == prefixes[2]
    assert state.all_model_checkpoint_paths == prefixes[1:]
    assert ss.latest_checkpoint(directory) == tf.train.latest_checkpoint(directory)


def test_tf_written_list_variables(tf_ckpt):
    got = ss.list_variables(tf_ckpt["dir"])
    assert got == [(n, list(s)) for n, s in tf.train.list_variables(tf_ckpt["prefix"])]
    assert got == sorted((n, list(v.shape)) for n, v in tf_ckpt["values"].items())


@pytest.mark.parametrize("name", sorted([*TF_VALUES, "emb", "wide"]))
def test_tf_written_load_variable(tf_ckpt, name):
    assert_bits_equal(ss.load_variable(tf_ckpt["prefix"], name), tf_ckpt["values"][name], name)
    assert_bits_equal(ss.load_variable(tf_ckpt["dir"], name + ":0"), tf_ckpt["values"][name], name)


def test_tf_written_restore_into_shardsave_variables(tf_ckpt):
    """Plain variables, TF's partitioned emb into a plain ss variable (whole), and TF's
    2-column-piece wide into an ss variable partitioned 3 ways on axis 1."""
    values = tf_ckpt["values"]
    with ss.Graph().as_default():
        plain = {n: ss.get_variable(n, shape=v.shape, dtype=v.dtype) for n, v in TF_VALUES.items()}
        emb = ss.get_variable("emb", shape=[10, 4])
        wide = ss.get_variable(
            "wide", shape=[4, 9], dtype=np.int64, partitioner=ss.fixed_size_partitioner(3, axis=1)
        )
        assert not emb.initialized and not wide.initialized
        ss.Saver().restore(tf_ckpt["prefix"])
    for name, var in plain.items():
        assert_bits_equal(var.value, values[name], name)
    assert_bits_equal(emb.value, EMB)
    assert len(wide.parts) == 3
    assert_bits_equal(wide.value, WIDE)
    for part in wide.parts:
        assert_bits_equal(part.value, WIDE[part.block_slices])


def test_tf_written_partitioned_get_slice_reads_only_needed_pieces(tf_ckpt):
    prefix = tf_ckpt["prefix"]
    reader = ss.CheckpointReader(prefix)
    assert_bits_equal(reader.get_slice("emb", slice(2, 8)), EMB[2:8])
    assert reader.bytes_read == EMB.nbytes  # rows 2..7 touch all three pieces (TF: no block CRCs)
    reader = ss.CheckpointReader(prefix)
    assert_bits_equal(reader.get_slice("emb", slice(4, 7)), EMB[4:7])
    assert reader.bytes_read == 3 * 4 * 4  # exactly the middle piece, rows 4..6
    reader = ss.CheckpointReader(prefix)
    assert_bits_equal(reader.get_slice("wide", (slice(None), 7)), WIDE[:, 7])
    assert reader.bytes_read == 4 * 4 * 8  # only the second column piece (columns 5..8)


def test_tf_object_checkpoint_fresh(tmp_path):
    w = _float_value(np.random.default_rng(3), np.float32, (2, 3))
    ckpt = tf.train.Checkpoint(w=tf.Variable(w), inner=tf.train.Checkpoint(s=tf.Variable([b"a", b"bc"])))
    path = ckpt.save(str(tmp_path / "ckpt"))
    assert ss.latest_checkpoint(str(tmp_path)) == path
    assert_bits_equal(ss.load_variable(path, "w/.ATTRIBUTES/VARIABLE_VALUE"), w)
    assert_bits_equal(
        ss.load_variable(path, "inner/s/.ATTRIBUTES/VARIABLE_VALUE"), np.array([b"a", b"bc"], dtype=object)
    )
    assert ss.load_variable(path, "save_counter/.ATTRIBUTES/VARIABLE_VALUE") == 1


def tf_saved_big(big: np.ndarray, tmp_path) -> str:
    """``big`` saved as variable "big" by TensorFlow's own Saver (one CRC per entry)."""
    graph = tf.Graph()
    with graph.as_default():
        v1.get_variable("big", initializer=tf.constant(big))
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            return saver.save(sess, str(tmp_path / "tf"), write_meta_graph=False)


def test_tf_written_big_tensors_restore_in_place_or_not_at_all(tmp_path):
    """TF writes one CRC per entry (no block checksums): the in-place restore checks the
    whole entry before writing into the variables' arrays."""
    big = np.arange(1024 * 640, dtype=np.float32).reshape(1024, 640)  # 2.5 MiB
    prefix = tf_saved_big(big, tmp_path)
    entry = ss.CheckpointReader(prefix).get_entries().entries["big"]
    assert not entry.block_size
    whole = ss.Variable("big", np.zeros_like(big), register=False)
    rows = [
        ss.Variable(
            "big", np.zeros((512, 640), np.float32), global_shape=big.shape, offset=(r, 0), register=False
        )
        for r in (0, 512)
    ]
    owns = [v.value for v in (whole, *rows)]
    ss.Saver([whole]).restore(prefix)
    ss.Saver({"big": rows}).restore(prefix)
    for v, own in zip((whole, *rows), owns, strict=True):
        assert v.value is own
        np.testing.assert_array_equal(own, big[v.block_slices])

    data_file = Path(prefix + ".data-00000-of-00001")
    damaged = bytearray(data_file.read_bytes())
    damaged[entry.offset + entry.size - 1] ^= 0x01
    data_file.write_bytes(bytes(damaged))
    for v in (whole, *rows):
        v.value[...] = -1
    for saver in (ss.Saver([whole]), ss.Saver({"big": rows})):
        with pytest.raises(ss.DataLossError, match=f"{entry.crc32c:#010x}"):
            saver.restore(prefix)
    assert all((v.value == -1).all() for v in (whole, *rows))
    # in one pass the whole entry lands in the whole variable before its one CRC can be
    # checked, and the error says so; row blocks of it go through a buffer (a checksum
    # block is the whole entry), so damage there still leaves them untouched
    with pytest.raises(ss.DataLossError, match=f"{entry.crc32c:#010x}") as info:
        ss.Saver([whole], restore_in_place="direct").restore(prefix)
    assert (info.value.partly, info.value.untouched) == (["big"], [])
    with pytest.raises(ss.DataLossError, match="on rank 0 no variable was written") as info:
        ss.Saver({"big": rows}, restore_in_place="direct").restore(prefix)
    assert (info.value.partly, info.value.untouched) == ([], ["big", "big"])
    assert all((v.value == -1).all() for v in rows)


def test_tf_written_big_tensors_restore_directly_in_one_pass(tmp_path):
    big = np.arange(1024 * 640, dtype=np.float32).reshape(1024, 640)  # 2.5 MiB, one CRC
    prefix = tf_saved_big(big, tmp_path)
    rows = [
        ss.Variable(
            "big", np.zeros((512, 640), np.float32), global_shape=big.shape, offset=(r, 0), register=False
        )
        for r in (0, 512)
    ]
    direct = ss.Saver({"big": rows}, restore_in_place="direct")
    direct.restore(prefix)
    for v in rows:
        np.testing.assert_array_equal(v.value, big[v.block_slices])
    # each half reads the whole entry to check its one CRC: what TF's format allows
    assert direct.last_restore_stats.bytes_reread == 0


def test_keep_checkpoint_every_n_hours_boundary_as_tensorflow(tmp_path, monkeypatch):
    """TF's Saver and shardsave's, on one fake clock (Saver made at t=0, N = 1 hour,
    max_to_keep=1), saving exactly at and after the preservation times: the same
    checkpoints stay on disk (TF keeps one only when strictly newer than the time)."""
    clock = {"now": 0.0}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    times = ((1, 3600.0), (2, 5000.0), (3, 7200.0), (4, 7200.5), (5, 9000.0))

    def run(directory: Path, make, save) -> set[str]:
        clock["now"] = 0.0
        saver = make()
        for step, now in times:
            clock["now"] = now
            save(saver, str(directory / "m"), step)
        return {n.removesuffix(".index") for n in os.listdir(directory) if n.endswith(".index")}

    variable = tf.Variable(np.arange(3.0))
    got_tf = run(
        tmp_path / "tf",
        lambda: v1.train.Saver(var_list=[variable], max_to_keep=1, keep_checkpoint_every_n_hours=1.0),
        lambda s, path, step: s.save(None, path, global_step=step, write_meta_graph=False),
    )
    with ss.Graph().as_default():
        ss.Variable("v", np.arange(3.0))
        got_ss = run(
            tmp_path / "ss",
            lambda: ss.Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1.0),
            lambda s, path, step: s.save(path, global_step=step),
        )
    monkeypatch.undo()
    assert got_tf == {"m-2", "m-4", "m-5"}
    assert got_ss == got_tf


def test_update_checkpoint_state_writes_what_tensorflow_writes(tmp_path):
    """By default (as TF's) absolute paths stay absolute, even those in the directory.
    (A relative path differs on purpose: TF writes it as given, shardsave relative to the
    directory, where readers look for it.)"""
    for directory, fn in (
        (tmp_path / "tf", v1.train.update_checkpoint_state),
        (tmp_path / "ss", ss.update_checkpoint_state),
    ):
        directory.mkdir()
        fn(
            str(directory),
            str(directory / "m-2"),
            [str(directory / "m-1"), "/elsewhere/m-0", str(directory / "m-2")],
        )
    text = {
        k: (tmp_path / k / "checkpoint").read_text().replace(str(tmp_path / k), "D") for k in ("tf", "ss")
    }
    assert text["ss"] == text["tf"]
    assert text["ss"].splitlines() == [
        'model_checkpoint_path: "D/m-2"',
        'all_model_checkpoint_paths: "D/m-1"',
        'all_model_checkpoint_paths: "/elsewhere/m-0"',
        'all_model_checkpoint_paths: "D/m-2"',
    ]
