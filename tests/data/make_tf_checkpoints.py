"""Write the golden TensorFlow checkpoints under tests/data/tf/ (needs TensorFlow).

Run from the repository root:  .venv/bin/python tests/data/make_tf_checkpoints.py

Everything is deterministic (np.arange / a seeded RNG), so re-running with the same
TF version gives the same tensor bytes.  The directory is wiped and rewritten.

Checkpoints (all via TF's own writers, nothing hand-made):

* tf/v1_saver/model.ckpt  graph mode, tf.compat.v1.train.Saver over resource variables
  made with tf.compat.v1.get_variable: one variable per dtype ("dt_<dtype>"), plus
  "scalar_float32" (shape []) and "empty_float32" (shape [0, 3]).  Every listed dtype,
  string included, could be a variable, so no tensor needed SaveV2.
* tf/partitioned/model.ckpt  graph mode, Saver over partitioned variables:
  "emb" [10, 4] fixed_size_partitioner(3) on axis 0 (rows 0-3, 4-6, 7-9), "wide" [4, 9]
  in 2 along axis 1 (columns 0-4, 5-8), and a plain "bias" [4].
* tf/sharded/model.ckpt  graph mode, Saver(sharded=True) over variables on two CPU
  devices: two data files (-00000-of-00002, -00001-of-00002) and a merged index.
* tf/object/ckpt-1  tf.train.Checkpoint(w=..., nested=...).save() in eager mode:
  object-based keys ("w/.ATTRIBUTES/VARIABLE_VALUE", "save_counter/...",
  "_CHECKPOINTABLE_OBJECT_GRAPH").
* tf/float8/model.ckpt  Saver over float8_e5m2 / float8_e4m3fn variables (DataType
  24 / 25), for readers that support them.

Expected values, keyed "<checkpoint dir>/<tensor name>" (e.g. "v1_saver/dt_int8",
"object/w/.ATTRIBUTES/VARIABLE_VALUE"; the name as listed by tf.train.list_variables):

* tf/expected.json: for every tensor {"dtype": TF dtype name, "dtype_enum": its
  DataType number, "shape": [...]}, and for DT_STRING tensors also "hex": the
  flattened values, each as a hex string.
* tf/expected.npz (no pickles): the values of every non-string tensor.  bfloat16 and
  float8 values are stored as their raw bits (uint16 / uint8 arrays);
  view them with ml_dtypes using the dtype from expected.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes
import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent / "tf"

NUMERIC_DTYPES = [
    "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
]  # fmt: skip
FLOAT8_DTYPES = ["float8_e5m2", "float8_e4m3fn"]
STRINGS = np.array([b"hi", b"", b"tensor", b"\x00\xff"], dtype=object)


def numeric_value(dtype: str, rng: np.random.Generator) -> np.ndarray:
    """A deterministic [3, 4] array of ``dtype`` that exercises the value range."""
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    if dtype == "bool":
        return (np.arange(12).reshape(3, 4) % 3 == 0).astype(bool)
    if dtype.startswith("complex"):
        re = rng.standard_normal((3, 4))
        im = rng.standard_normal((3, 4))
        return (re + 1j * im).astype(np_dtype)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(np_dtype)
        vals = np.arange(12, dtype=np.int64).reshape(3, 4) * 7 - 20
        if info.min == 0:
            vals = np.abs(vals)
        out = vals.astype(np_dtype)
        out.flat[0], out.flat[-1] = info.min, info.max  # extremes of the type
        return out
    # Floating point (incl. bfloat16 / float8): random values plus specials.
    vals = rng.standard_normal((3, 4)).astype(np.float32)
    vals.flat[:4] = [np.inf, -np.inf, -0.0, 1.0]
    if dtype != "float8_e4m3fn":  # e4m3fn has no infinities: +-inf would turn to NaN
        out = vals.astype(np_dtype)
    else:
        vals.flat[:2] = [448.0, -448.0]
        out = vals.astype(np_dtype)
    out.flat[4] = np.nan
    return out


def _init_from(full: np.ndarray):
    """A get_variable initializer that hands each partition its part of ``full``."""

    def init(shape, dtype=None, partition_info=None):
        if partition_info is None:
            return tf.constant(full)
        index = tuple(slice(o, o + n) for o, n in zip(partition_info.var_offset, shape, strict=True))
        return tf.constant(full[index])

    return init


def save_graph_vars(prefix: Path, make_vars, *, sharded: bool = False, devices: int = 1) -> None:
    """Build variables with ``make_vars()`` in a fresh graph; save them with Saver."""
    prefix.parent.mkdir(parents=True, exist_ok=True)  # sharded saves need it
    graph = tf.Graph()
    with graph.as_default():
        make_vars()
        saver = tf.compat.v1.train.Saver(sharded=sharded, save_relative_paths=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": devices})
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False)


def make_v1_saver(rng: np.random.Generator) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    for dtype in NUMERIC_DTYPES:
        values[f"dt_{dtype}"] = numeric_value(dtype, rng)
    values["dt_string"] = STRINGS
    values["scalar_float32"] = np.array(3.25, dtype=np.float32)
    values["empty_float32"] = np.zeros((0, 3), dtype=np.float32)

    def make_vars() -> None:
        for name, value in values.items():
            dtype = tf.string if value.dtype == object else tf.as_dtype(value.dtype)
            tf.compat.v1.get_variable(name, initializer=tf.constant(value, dtype=dtype))

    save_graph_vars(OUT / "v1_saver" / "model.ckpt", make_vars)
    return values


def make_float8(rng: np.random.Generator) -> dict[str, np.ndarray]:
    values = {f"dt_{d}": numeric_value(d, rng) for d in FLOAT8_DTYPES}

    def make_vars() -> None:
        for name, value in values.items():
            tf.compat.v1.get_variable(name, initializer=tf.constant(value))

    save_graph_vars(OUT / "float8" / "model.ckpt", make_vars)
    return values


def make_partitioned() -> dict[str, np.ndarray]:
    values = {
        "emb": np.arange(40, dtype=np.float32).reshape(10, 4),
        "wide": (np.arange(36, dtype=np.int64).reshape(4, 9) - 10) * 1000,
        "bias": np.array([0.5, -1.5, 2.5, -3.5], dtype=np.float32),
    }

    def make_vars() -> None:
        v1 = tf.compat.v1
        v1.get_variable(
            "emb",
            shape=[10, 4],
            dtype=tf.float32,
            initializer=_init_from(values["emb"]),
            partitioner=v1.fixed_size_partitioner(3, axis=0),
        )
        v1.get_variable(
            "wide",
            shape=[4, 9],
            dtype=tf.int64,
            initializer=_init_from(values["wide"]),
            partitioner=lambda shape, dtype: [1, 2],
        )
        v1.get_variable("bias", initializer=tf.constant(values["bias"]))

    save_graph_vars(OUT / "partitioned" / "model.ckpt", make_vars)
    return values


def make_sharded() -> dict[str, np.ndarray]:
    values = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.arange(5, dtype=np.int32) * -3,
        "c": np.array([1.0, 2.0, 4.0], dtype=np.float64),
    }

    def make_vars() -> None:
        for i, (name, value) in enumerate(values.items()):
            with tf.device(f"/cpu:{i % 2}"):
                tf.compat.v1.get_variable(name, initializer=tf.constant(value))

    save_graph_vars(OUT / "sharded" / "model.ckpt", make_vars, sharded=True, devices=2)
    return values


def make_object() -> dict[str, np.ndarray]:
    w = np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3)
    k = np.array([[1, 2], [3, 4]], dtype=np.int32)
    ckpt = tf.train.Checkpoint(
        w=tf.Variable(w),
        nested=tf.train.Checkpoint(k=tf.Variable(k), s=tf.Variable(b"text")),
    )
    path = ckpt.save(str(OUT / "object" / "ckpt"))
    assert path == str(OUT / "object" / "ckpt-1"), path
    return {
        "w/.ATTRIBUTES/VARIABLE_VALUE": w,
        "nested/k/.ATTRIBUTES/VARIABLE_VALUE": k,
        "nested/s/.ATTRIBUTES/VARIABLE_VALUE": np.array(b"text", dtype=object),
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1, dtype=np.int64),
    }


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object or b.dtype == object:
        return a.shape == b.shape and all(x == y for x, y in zip(a.flat, b.flat, strict=True))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.tobytes() == b.tobytes()  # bit-exact (NaN, -0.0)


def verify_and_collect(
    prefix: Path, fed: dict[str, np.ndarray], key_dir: str
) -> tuple[dict, dict[str, np.ndarray]]:
    """Read the checkpoint back with TF; check it against what was fed in."""
    meta: dict = {}
    arrays: dict[str, np.ndarray] = {}
    assert tf.train.latest_checkpoint(str(prefix.parent)) == str(prefix)
    listed = dict(tf.train.list_variables(str(prefix)))
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    extra = set(listed) - set(fed)
    assert extra <= {"_CHECKPOINTABLE_OBJECT_GRAPH"}, extra
    assert set(fed) <= set(listed), set(fed) - set(listed)
    for name in sorted(listed):
        value = np.asarray(reader.get_tensor(name))
        dtype = dtypes[name]
        if dtype == tf.string:
            value = value.astype(object)
        if name in fed:
            want = fed[name]
            assert list(want.shape) == listed[name], (name, want.shape, listed[name])
            assert _same(value, want), (name, value, want)
        key = f"{key_dir}/{name}"
        meta[key] = {
            "dtype": dtype.name,
            "dtype_enum": dtype.as_datatype_enum,
            "shape": list(value.shape),
        }
        if dtype == tf.string:
            meta[key]["hex"] = [bytes(x).hex() for x in value.flat]
        elif value.dtype == ml_dtypes.bfloat16:
            arrays[key] = value.view(np.uint16)
        elif dtype.name.startswith("float8"):
            arrays[key] = value.view(np.uint8)
        else:
            arrays[key] = value
    return meta, arrays


def main() -> int:
    print("TensorFlow", tf.__version__)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(20240601)

    jobs = [  # the tf.compat.v1 ones build their own tf.Graph, so no global graph mode
        ("v1_saver", "model.ckpt", make_v1_saver(rng)),
        ("float8", "model.ckpt", make_float8(rng)),
        ("partitioned", "model.ckpt", make_partitioned()),
        ("sharded", "model.ckpt", make_sharded()),
    ]
    jobs.append(("object", "ckpt-1", make_object()))

    meta: dict = {"tensorflow_version": tf.__version__, "tensors": {}}
    arrays: dict[str, np.ndarray] = {}
    for key_dir, name, fed in jobs:
        m, a = verify_and_collect(OUT / key_dir / name, fed, key_dir)
        meta["tensors"].update(m)
        arrays.update(a)
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(OUT / "expected.npz", **arrays)

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:8d}  {p.relative_to(OUT)}")
    print(f"{total} bytes in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
