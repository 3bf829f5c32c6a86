"""The public API of issue 2, without TensorFlow: the seed programs, Variables, the Saver
(retention, state file), the command-line tools, and every bad input's error and message.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from cli_helpers import completed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardsave as ss
import shardsave.cli as shardsave_cli
import shardsave.save.protocol as save_protocol_module
import shardsave.saver as saver_module
from shardsave import _inspect, errors

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA_FILE = ".data-00000-of-00001"


@pytest.fixture(autouse=True)
def fresh_graph():
    ss.reset_default_graph()
    yield
    ss.reset_default_graph()


@pytest.fixture
def no_hang():
    """Fail instead of hanging forever (damaged files must never loop)."""

    def on_alarm(signum, frame):
        raise TimeoutError("took more than 30 s: hang?")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def cli(*args: str) -> subprocess.CompletedProcess:
    """``shardsave ARGS``, in this process (test_console_script_installed and the first
    inspect_checkpoint call below start real processes)."""
    return completed(shardsave_cli.main, *args)


def inspect_module(*args: str) -> subprocess.CompletedProcess:
    return completed(_inspect.main, *args)


def files(directory: Path) -> set[str]:
    return {p.name for p in Path(directory).iterdir()}


def save_simple(path: Path, **values) -> str:
    """Save ``values`` (name -> array) at ``path`` from a graph of their own."""
    with ss.Graph().as_default():
        variables = [ss.Variable(name, value) for name, value in values.items()]
        return ss.Saver(variables).save(str(path))


# ---------------------------------------------------------------------- seed programs
def test_seed_programs_print_tensorflow_values(tmp_path):
    path = str(tmp_path / "not" / "yet" / "model.ckpt")  # save creates the directories
    out = run(str(EXAMPLES / "save_model.py"), path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"Model saved in path: {path}\n"
    assert files(tmp_path / "not" / "yet") == {"checkpoint", "model.ckpt.index", "model.ckpt" + DATA_FILE}

    out = run(str(EXAMPLES / "restore_model.py"), path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "v1 : [1. 1. 1.]\nv2 : [-1. -1. -1. -1. -1.]\n"

    out = run(str(EXAMPLES / "restore_subset.py"), path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "v1 : [0. 0. 0.]\nv2 : [-1. -1. -1. -1. -1.]\n"

    out = run(str(EXAMPLES / "inspect_model.py"), path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # all tensors: name, dtype, shape, values, then the total; then v1 alone
    assert lines[0].split()[-3:] == ["v1", "(float32)", "[3]"] and lines[1] == "[1. 1. 1.]"
    assert lines[2].split()[-3:] == ["v2", "(float32)", "[5]"] and lines[3] == "[-1. -1. -1. -1. -1.]"
    assert lines[4] == "# Total number of params: 8"
    assert lines[5].split()[-3:] == ["v1", "(float32)", "[3]"] and lines[6] == "[1. 1. 1.]"
    assert lines[7] == "# Total number of params: 3"
    assert len(lines) == 8


def test_seed_rename(tmp_path):
    out = run(str(EXAMPLES / "rename.py"), str(tmp_path / "rename.ckpt"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "param : [[0. 1. 2.]\n [3. 4. 5.]]\n"
    assert ss.list_variables(str(tmp_path / "rename.ckpt")) == [("weight", [2, 3])]


# ---------------------------------------------------------------------------- Variable
def test_variable_before_initialization():
    v = ss.get_variable("layer/kernel", shape=[2, 3])
    assert not v.initialized
    assert v.name == "layer/kernel" and v.shape == (2, 3) and v.dtype == np.float32
    with pytest.raises(ss.FailedPreconditionError, match="'layer/kernel'"):
        v.value  # noqa: B018
    with pytest.raises(ss.FailedPreconditionError, match="'layer/kernel'"):
        np.asarray(v)
    with pytest.raises(RuntimeError):  # the built-in it also is
        v.numpy()


def test_variable_assign_and_array_protocol():
    v = ss.get_variable("v", shape=[3], initializer=ss.zeros_initializer)
    assert v.initialized
    np.testing.assert_array_equal(v.value, [0, 0, 0])
    source = np.array([1.5, 2.5, 3.5])
    assert v.assign(source) is v
    source[0] = 99  # assign copied
    assert v.value.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(v), np.array([1.5, 2.5, 3.5], np.float32))
    assert np.asarray(v, dtype=np.float64).dtype == np.float64
    v.assign(v.value + 1)
    np.testing.assert_array_equal(v.value, [2.5, 3.5, 4.5])
    with pytest.raises(ss.InvalidArgumentError, match=r"\[2\].*\[3\]"):
        v.assign([1.0, 2.0])
    w = ss.Variable("w", np.arange(4, dtype=np.int16).reshape(2, 2))
    assert w.dtype == np.int16 and w.shape == (2, 2)


def test_initializers():
    c = ss.get_variable("c", [2, 2], initializer=ss.constant_initializer(7.0))
    o = ss.get_variable("o", [3], dtype=np.int32, initializer=ss.ones_initializer())
    n1 = ss.get_variable("n1", [50], initializer=ss.random_normal_initializer(seed=4))
    n2 = ss.get_variable("n2", [50], initializer=ss.random_normal_initializer(seed=4))
    u = ss.get_variable("u", [1000], initializer=ss.random_uniform_initializer(-2, 3, seed=1))
    np.testing.assert_array_equal(c.value, np.full((2, 2), 7.0))
    assert o.value.dtype == np.int32 and o.value.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(n1.value, n2.value)
    assert n1.value.std() > 0.5
    assert u.value.min() >= -2 and u.value.max() <= 3 and u.value.max() - u.value.min() > 4


def test_default_graph_duplicates_and_reset():
    a = ss.get_variable("a", [1], initializer=ss.zeros_initializer)
    b = ss.Variable("b", np.ones(2))
    p = ss.get_variable(
        "p", [6, 2], initializer=ss.ones_initializer, partitioner=ss.fixed_size_partitioner(2)
    )
    assert ss.global_variables() == [a, b, p]
    with pytest.raises(ss.InvalidArgumentError, match="'a'"):
        ss.get_variable("a", [1], initializer=ss.zeros_initializer)
    with pytest.raises(ss.InvalidArgumentError, match="'b'"):
        ss.Variable("b", np.ones(2))
    with pytest.raises(ss.InvalidArgumentError, match="'p'"):
        ss.Variable("p", np.ones(2))
    assert ss.global_variables() == [a, b, p]
    ss.reset_default_graph()
    assert ss.global_variables() == []
    a2 = ss.get_variable("a", [1], initializer=ss.ones_initializer)  # the name is free again
    assert ss.global_variables() == [a2]
    np.testing.assert_array_equal(a.value, [0.0])  # old variables keep working


# ------------------------------------------------------------------------------- Saver
def test_saver_var_list_forms(tmp_path):
    a = ss.Variable("a", np.arange(3, dtype=np.float32))
    b = ss.Variable("b", np.arange(4, dtype=np.int64))
    ss.Saver([a, b]).save(str(tmp_path / "list"))
    ss.Saver({"renamed/a": a}).save(str(tmp_path / "dict"))
    ss.Saver().save(str(tmp_path / "all"))
    assert ss.list_variables(str(tmp_path / "list")) == [("a", [3]), ("b", [4])]
    assert ss.list_variables(str(tmp_path / "dict")) == [("renamed/a", [3])]
    assert ss.list_variables(str(tmp_path / "all")) == [("a", [3]), ("b", [4])]

    a.assign([9, 9, 9])
    b.assign([7, 7, 7, 7])
    ss.Saver([b]).restore(str(tmp_path / "list"))  # only b
    np.testing.assert_array_equal(a.value, [9, 9, 9])
    np.testing.assert_array_equal(b.value, [0, 1, 2, 3])
    ss.Saver({"renamed/a": a}).restore(str(tmp_path / "dict"))
    np.testing.assert_array_equal(a.value, [0, 1, 2])


def test_saver_with_no_variables(tmp_path):
    with pytest.raises(ss.InvalidArgumentError, match="no variables"):
        ss.Saver()
    prefix = ss.Saver(allow_empty=True).save(str(tmp_path / "empty"))
    assert ss.list_variables(prefix) == []


def test_all_dtypes_round_trip(tmp_path):
    import ml_dtypes

    values = {
        f"dt_{np.dtype(dt).name}": (np.arange(12).reshape(3, 4) - 5).astype(dt)
        for dt in (
            np.float16,
            np.float32,
            np.float64,
            ml_dtypes.bfloat16,
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.complex64,
            np.complex128,
        )
    }
    values["dt_float64"].flat[:3] = [np.nan, -0.0, np.inf]
    values["dt_bool"] = np.arange(6).reshape(2, 3) % 2 == 0
    values["scalar"] = np.array(2.5, np.float32)
    values["empty"] = np.zeros((0, 3), np.float32)
    values["strings"] = np.array([[b"a", b""], [b"\x00\xff", b"z" * 1000]], dtype=object)
    values["big"] = np.arange(100_000, dtype=np.float32)
    prefix = save_simple(tmp_path / "m", **values)
    with ss.Graph().as_default():
        targets = {n: ss.get_variable(n, shape=v.shape, dtype=v.dtype) for n, v in values.items()}
        ss.Saver().restore(prefix)
    for name, value in values.items():
        got = targets[name].value
        assert got.dtype == value.dtype and got.shape == value.shape, name
        if value.dtype == object:
            assert got.tolist() == value.tolist()
        else:
            assert got.tobytes() == value.tobytes(), name


def test_unicode_strings_are_stored_as_utf8_bytes(tmp_path):
    prefix = save_simple(tmp_path / "m", s=np.array(["h\u00e9", "x"]))
    assert ss.load_variable(prefix, "s").tolist() == ["h\u00e9".encode(), b"x"]


def test_global_step_and_pad_step_number(tmp_path):
    v = ss.Variable("v", np.ones(2))
    step = ss.Variable("global_step", np.array(42, np.int64))
    base = str(tmp_path / "model.ckpt")
    assert ss.Saver().save(base, global_step=7) == base + "-7"
    assert ss.Saver([v]).save(base, global_step=step) == base + "-42"
    assert ss.Saver([v]).save(base, global_step=np.int32(5)) == base + "-5"
    assert ss.Saver([v], pad_step_number=True).save(base, global_step=123) == base + "-00000123"
    assert os.path.exists(base + "-00000123.index")
    assert ss.latest_checkpoint(str(tmp_path)) == base + "-00000123"


def test_max_to_keep_deletes_old_files_and_state_lists_kept(tmp_path):
    ss.Variable("v", np.ones(2))
    saver = ss.Saver(max_to_keep=3)
    base = str(tmp_path / "m")
    prefixes = [saver.save(base, global_step=i) for i in range(6)]
    assert saver.last_checkpoints == prefixes[3:]
    assert files(tmp_path) == {"checkpoint"} | {
        f"m-{i}{ext}" for i in (3, 4, 5) for ext in (".index", DATA_FILE)
    }
    state = ss.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == prefixes[5]
    assert state.all_model_checkpoint_paths == prefixes[3:]
    assert len(state.all_model_checkpoint_timestamps) == 3
    text = (tmp_path / "checkpoint").read_text()
    assert f'model_checkpoint_path: "{prefixes[5]}"' in text
    assert text.count("all_model_checkpoint_paths:") == 3
    assert ss.latest_checkpoint(str(tmp_path)) == prefixes[5]


def test_max_to_keep_none_keeps_everything(tmp_path):
    ss.Variable("v", np.ones(2))
    saver = ss.Saver(max_to_keep=None)
    for i in range(7):
        saver.save(str(tmp_path / "m"), global_step=i)
    assert sum(name.endswith(".index") for name in files(tmp_path)) == 7
    assert ss.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-6")


def test_keep_checkpoint_every_n_hours_tiny_keeps_every_file(tmp_path):
    ss.Variable("v", np.ones(2))
    saver = ss.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1e-9)
    prefixes = [saver.save(str(tmp_path / "m"), global_step=i) for i in range(5)]
    assert all(os.path.exists(p + ".index") and os.path.exists(p + DATA_FILE) for p in prefixes)
    assert saver.last_checkpoints == prefixes[3:]
    state = ss.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_paths == prefixes[3:]
    assert state.last_preserved_timestamp > 0


def test_keep_checkpoint_every_n_hours_follows_tensorflow(tmp_path, monkeypatch):
    """TF's rule, on a fake clock: a checkpoint leaving the max_to_keep window is kept when
    it is newer than the next preservation time, which then moves on by N hours."""
    clock = types.SimpleNamespace(now=0.0)
    fake_time = types.SimpleNamespace(time=lambda: clock.now)
    monkeypatch.setattr(saver_module, "time", fake_time)  # the first preservation time
    monkeypatch.setattr(save_protocol_module, "time", fake_time)  # each save's timestamp
    ss.Variable("v", np.ones(2))
    saver = ss.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1.0)  # next preservation: 3600 s
    for step in range(1, 11):
        clock.now = step * 1000.0
        saver.save(str(tmp_path / "m"), global_step=step)
    # leaving the window: 1000, 2000, 3000 deleted; 4000 kept (> 3600, next 7200);
    # 5000, 6000, 7000 deleted; 8000 kept (> 7200); 9000 and 10000 are the window
    assert {n for n in files(tmp_path) if n.endswith(".index")} == {
        "m-4.index",
        "m-8.index",
        "m-9.index",
        "m-10.index",
    }
    assert not os.path.exists(tmp_path / ("m-5" + DATA_FILE))
    state = ss.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_paths == [str(tmp_path / "m-9"), str(tmp_path / "m-10")]
    assert state.all_model_checkpoint_timestamps == [9000.0, 10000.0]
    assert state.last_preserved_timestamp == 8000.0


def test_recover_last_checkpoints(tmp_path):
    ss.Variable("v", np.ones(2))
    first = ss.Saver(max_to_keep=5)
    prefixes = [first.save(str(tmp_path / "m"), global_step=i) for i in range(3)]
    restarted = ss.Saver(max_to_keep=3)
    assert restarted.last_checkpoints == []
    state = ss.get_checkpoint_state(str(tmp_path))
    restarted.recover_last_checkpoints(state.all_model_checkpoint_paths + [str(tmp_path / "m-99")])
    assert restarted.last_checkpoints == prefixes  # m-99 has no index: not adopted
    new = restarted.save(str(tmp_path / "m"), global_step=3)
    assert restarted.last_checkpoints == prefixes[1:] + [new]
    assert not os.path.exists(prefixes[0] + ".index")
    assert not os.path.exists(prefixes[0] + DATA_FILE)
    assert ss.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths == prefixes[1:] + [new]


def test_save_relative_paths(tmp_path):
    ss.Variable("v", np.arange(3.0))
    saver = ss.Saver(save_relative_paths=True, max_to_keep=2)
    for i in range(3):
        saver.save(str(tmp_path / "run" / "m"), global_step=i)
    text = (tmp_path / "run" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "m-2"' in text
    assert 'all_model_checkpoint_paths: "m-1"' in text
    assert str(tmp_path) not in text
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))  # relative paths survive a move
    assert ss.latest_checkpoint(str(tmp_path / "moved")) == str(tmp_path / "moved" / "m-2")
    np.testing.assert_array_equal(ss.load_variable(str(tmp_path / "moved"), "v"), np.arange(3.0))

    ss.Saver().save(str(tmp_path / "abs" / "m"))
    assert (
        f'model_checkpoint_path: "{tmp_path / "abs" / "m"}"' in (tmp_path / "abs" / "checkpoint").read_text()
    )


def test_write_state_and_latest_filename(tmp_path):
    ss.Variable("v", np.ones(2))
    saver = ss.Saver()
    saver.save(str(tmp_path / "m"), write_state=False)
    assert files(tmp_path) == {"m.index", "m" + DATA_FILE}
    saver.save(str(tmp_path / "n"), latest_filename="other_state")
    assert "checkpoint" not in files(tmp_path)
    assert ss.latest_checkpoint(str(tmp_path), latest_filename="other_state") == str(tmp_path / "n")
    assert ss.latest_checkpoint(str(tmp_path)) is None


def test_latest_checkpoint_without_state_or_index(tmp_path):
    assert ss.latest_checkpoint(str(tmp_path)) is None
    assert ss.get_checkpoint_state(str(tmp_path)) is None
    ss.Variable("v", np.ones(2))
    saver = ss.Saver()
    first = saver.save(str(tmp_path / "m"), global_step=1)
    second = saver.save(str(tmp_path / "m"), global_step=2)
    os.remove(second + ".index")  # as after a save that died before its commit
    assert ss.latest_checkpoint(str(tmp_path)) == first


def test_save_into_missing_directory_creates_it(tmp_path):
    ss.Variable("v", np.arange(4.0))
    prefix = ss.Saver().save(str(tmp_path / "a" / "b" / "c" / "model"))
    assert (tmp_path / "a" / "b" / "c" / "model.index").is_file()
    np.testing.assert_array_equal(ss.load_variable(prefix, "v"), np.arange(4.0))


def test_restore_partitioned_and_reshape(tmp_path):
    full = np.arange(30, dtype=np.float32).reshape(10, 3)
    pv = ss.get_variable("emb", [10, 3], initializer=full, partitioner=ss.fixed_size_partitioner(3))
    prefix = ss.Saver().save(str(tmp_path / "m"))
    np.testing.assert_array_equal(ss.load_variable(prefix, "emb"), full)
    ss.reset_default_graph()
    two = ss.get_variable("emb", [10, 3], partitioner=ss.fixed_size_partitioner(2))
    ss.Saver().restore(prefix)
    np.testing.assert_array_equal(np.asarray(two), full)
    assert pv.partitions == [3, 1] and two.partitions == [2, 1]
    reader = ss.CheckpointReader(prefix)
    np.testing.assert_array_equal(reader.get_slice("emb", (slice(3, 5), 1)), full[3:5, 1])
    assert reader.has_tensor("emb") and not reader.has_tensor("emb/part_0")
    assert reader.get_variable_to_dtype_map() == {"emb": np.float32}
    assert reader.debug_string() == b"emb (DT_FLOAT) [10, 3]\n"


def test_reshape_true_restores_when_sizes_agree(tmp_path):
    prefix = save_simple(tmp_path / "m", v=np.arange(6, dtype=np.float32))
    v = ss.get_variable("v", [2, 3])
    ss.Saver([v], reshape=True).restore(prefix)
    np.testing.assert_array_equal(v.value, np.arange(6, dtype=np.float32).reshape(2, 3))
    w = ss.get_variable("w", [4], initializer=ss.zeros_initializer)
    with pytest.raises(ss.InvalidArgumentError, match=r"\[4\].*\[6\]"):
        ss.Saver({"v": w}, reshape=True).restore(prefix)  # sizes differ: still an error
    np.testing.assert_array_equal(w.value, np.zeros(4))


# --------------------------------------------------------------------------------- CLI
@pytest.fixture
def ckpt_dir(tmp_path):
    with ss.Graph().as_default():
        ss.Variable("weight", np.arange(6, dtype=np.float32).reshape(2, 3))
        ss.Variable("bias", np.array([0.5, -0.5], np.float32))
        ss.Variable("big", np.arange(20, dtype=np.int64))
        saver = ss.Saver()
        prefixes = [saver.save(str(tmp_path / "model.ckpt"), global_step=s) for s in (10, 20, 30)]
    return tmp_path, prefixes


def test_cli_inspect(ckpt_dir):
    directory, prefixes = ckpt_dir
    out = cli("inspect", prefixes[0])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert prefixes[0] in lines[0]
    assert lines[1:] == [
        "bias  float32  [2]",
        "big  int64  [20]",
        "weight  float32  [2, 3]",
        "# Total number of params: 28",
    ]
    out = cli("inspect", str(directory), "--tensor", "weight", "--values")  # a directory: the latest
    assert out.returncode == 0, out.stderr
    assert prefixes[2] in out.stdout
    assert "weight  float32  [2, 3]\n[[0. 1. 2.]\n [3. 4. 5.]]\n# Total number of params: 6" in out.stdout
    assert "bias" not in out.stdout


def test_cli_inspect_errors(ckpt_dir, tmp_path):
    directory, prefixes = ckpt_dir
    out = cli("inspect", prefixes[2], "--tensor", "weights")
    assert out.returncode == 1
    assert "'weights'" in out.stderr and "'weight'" in out.stderr  # a close name is suggested
    assert "Traceback" not in out.stderr
    missing = str(tmp_path / "nothing" / "here")
    out = cli("inspect", missing)
    assert out.returncode == 1 and missing in out.stderr and "Traceback" not in out.stderr
    assert cli("inspect").returncode == 2
    assert cli("frobnicate", str(directory)).returncode == 2


def test_cli_ls(ckpt_dir):
    directory, prefixes = ckpt_dir
    out = cli("ls", str(directory))
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["model.ckpt-10", "model.ckpt-20", "model.ckpt-30"]  # newest last
    assert [r[1] for r in rows] == ["10", "20", "30"]
    for row, prefix in zip(rows, prefixes, strict=True):
        size = os.path.getsize(prefix + ".index") + os.path.getsize(prefix + DATA_FILE)
        assert row[2] == str(size)
    assert out.stdout.splitlines()[-1].endswith("(latest)")
    assert "(latest)" not in out.stdout.splitlines()[1]


def test_cli_gc_deletes_data_files_without_index(ckpt_dir):
    directory, prefixes = ckpt_dir
    orphan = directory / ("model.ckpt-40" + DATA_FILE)
    orphan.write_bytes(b"x" * 100)  # a save that died before its index
    tmp_index = directory / "model.ckpt-40.index.tmp0123"
    tmp_index.write_bytes(b"partial")
    keep = files(directory) - {orphan.name, tmp_index.name}

    out = cli("gc", str(directory), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert str(orphan) in out.stdout and str(tmp_index) in out.stdout and "would delete" in out.stdout
    assert orphan.exists() and tmp_index.exists()

    out = cli("gc", str(directory))
    assert out.returncode == 0, out.stderr
    assert str(orphan) in out.stdout and str(tmp_index) in out.stdout
    assert "2 leftover file(s) deleted" in out.stdout
    assert files(directory) == keep
    for p in prefixes:
        assert ss.list_variables(p) == [("bias", [2]), ("big", [20]), ("weight", [2, 3])]

    out = cli("gc", str(directory))
    assert out.returncode == 0 and "0 leftover file(s) deleted" in out.stdout


def test_inspect_checkpoint_module_every_flag(ckpt_dir):
    directory, prefixes = ckpt_dir
    mod = ("-m", "shardsave.inspect_checkpoint", "--file_name")
    out = run(*mod, prefixes[2])  # no tensor: the reader's debug string (a real process)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "bias (DT_FLOAT) [2]\nbig (DT_INT64) [20]\nweight (DT_FLOAT) [2, 3]\n"

    out = inspect_module(*mod[2:], prefixes[2], "--tensor_name", "bias")
    assert out.returncode == 0, out.stderr
    assert "bias" in out.stdout.splitlines()[0] and "float32" in out.stdout.splitlines()[0]
    assert "[ 0.5 -0.5]" in out.stdout and "# Total number of params: 2" in out.stdout

    out = inspect_module(*mod[2:], str(directory), "--all_tensors")
    assert out.returncode == 0, out.stderr
    assert "[[0. 1. 2.]\n [3. 4. 5.]]" in out.stdout and "19]" in out.stdout
    assert out.stdout.rstrip().endswith("# Total number of params: 28")

    out = inspect_module(*mod[2:], prefixes[2], "--all_tensor_names")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["bias", "big", "weight"]
    assert "[3. 4. 5.]" not in out.stdout and lines[-1] == "# Total number of params: 28"

    out = inspect_module(*mod[2:], prefixes[2], "--tensor_name", "big")
    assert "..." not in out.stdout and " 9 10 " in out.stdout
    out = inspect_module(
        *mod[2:], prefixes[2], "--tensor_name", "big", "--printoptions", "threshold=5", "edgeitems=2"
    )
    assert out.returncode == 0, out.stderr
    assert "[ 0  1 ... 18 19]" in out.stdout

    out = inspect_module(*mod[2:], prefixes[2], "--printoptions", "no_such_option=1")
    assert out.returncode == 2 and "no_such_option" in out.stderr
    out = inspect_module(*mod[2:], prefixes[2], "--tensor_name", "weights")
    assert out.returncode == 1 and "'weights'" in out.stderr and "'weight'" in out.stderr
    out = inspect_module(*mod[2:], str(directory / "missing"))
    assert out.returncode == 1 and "missing" in out.stderr


def test_console_script_installed(ckpt_dir):
    exe = Path(sys.executable).parent / "shardsave"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "inspect", ckpt_dir[1][0]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "# Total number of params: 28" in out.stdout


# ---------------------------------------------------------------------------- errors
def test_error_hierarchy():
    pairs = [
        (ss.NotFoundError, KeyError),
        (ss.InvalidArgumentError, ValueError),
        (ss.DataLossError, OSError),
        (ss.FailedPreconditionError, RuntimeError),
        (ss.AbortedError, RuntimeError),
    ]
    for cls, builtin in pairs:
        assert issubclass(cls, ss.ShardsaveError) and issubclass(cls, builtin), cls
        assert getattr(errors, cls.__name__) is cls
    assert str(ss.NotFoundError("no 'x' here")) == "no 'x' here"  # not quoted like a KeyError


@pytest.fixture
def two_vars(tmp_path):
    """A checkpoint of a (float32 [3]) and b (int32 [2, 2]), and both variables with
    other values, so a restore that changes anything is visible."""
    prefix = save_simple(
        tmp_path / "ckpt" / "model",
        a=np.array([1, 2, 3], np.float32),
        b=np.arange(4, dtype=np.int32).reshape(2, 2),
    )
    a = ss.Variable("a", np.array([-1, -1, -1], np.float32))
    b = ss.Variable("b", np.full((2, 2), -1, np.int32))
    return prefix, a, b


def assert_unchanged(a, b):
    np.testing.assert_array_equal(a.value, [-1, -1, -1])
    np.testing.assert_array_equal(b.value, np.full((2, 2), -1))


def test_restore_missing_name_suggests_close_names(two_vars):
    prefix, a, b = two_vars
    weights = ss.Variable("weights", np.zeros(3, np.float32))
    save_simple(Path(prefix + "_w"), weight=np.zeros(3, np.float32), weight_decay=np.zeros(1, np.float32))
    with pytest.raises(ss.NotFoundError) as info:
        ss.Saver([weights]).restore(prefix + "_w")
    msg = str(info.value)
    assert prefix + "_w" in msg and "'weights'" in msg and "'weight'" in msg and "'weight_decay'" in msg
    with pytest.raises(KeyError):
        ss.Saver({"a": a, "c": b}).restore(prefix)
    assert_unchanged(a, b)
    with pytest.raises(ss.NotFoundError, match="'weights'.*'weight'"):
        ss.load_variable(prefix + "_w", "weights")
    with pytest.raises(ss.NotFoundError, match="'nope'"):
        ss.CheckpointReader(prefix).get_tensor("nope")


def test_restore_shape_mismatch_names_both_shapes(two_vars):
    prefix, a, b = two_vars
    wrong = ss.Variable("wrong", np.full((4,), -1, np.int32), register=False)
    with pytest.raises(ss.InvalidArgumentError) as info:
        ss.Saver({"a": a, "b": wrong}).restore(prefix)
    msg = str(info.value)
    assert prefix in msg and "'b'" in msg and "[4]" in msg and "[2, 2]" in msg
    assert isinstance(info.value, ValueError)
    np.testing.assert_array_equal(a.value, [-1, -1, -1])  # a, first, is untouched
    np.testing.assert_array_equal(wrong.value, [-1] * 4)
    ss.Saver({"a": a, "b": wrong}, reshape=True).restore(prefix)  # 4 == 2 * 2
    np.testing.assert_array_equal(wrong.value, [0, 1, 2, 3])
    np.testing.assert_array_equal(a.value, [1, 2, 3])


def test_restore_dtype_mismatch_names_both_dtypes(two_vars):
    prefix, a, b = two_vars
    wrong = ss.Variable("wrong", np.full((2, 2), -1, np.float64), register=False)
    with pytest.raises(ss.InvalidArgumentError) as info:
        ss.Saver({"a": a, "b": wrong}).restore(prefix)
    msg = str(info.value)
    assert prefix in msg and "'b'" in msg and "float64" in msg and "int32" in msg
    np.testing.assert_array_equal(a.value, [-1, -1, -1])
    with pytest.raises(ss.InvalidArgumentError, match="float64.*int32"):  # reshape does not cast
        ss.Saver({"b": wrong}, reshape=True).restore(prefix)


def test_restore_without_checkpoint(tmp_path):
    v = ss.Variable("v", np.ones(2))
    for missing in (tmp_path / "nothing", tmp_path / "no" / "dir" / "model.ckpt", tmp_path):
        with pytest.raises(ss.NotFoundError) as info:
            ss.Saver().restore(str(missing))
        assert str(missing) in str(info.value)
    with pytest.raises(ss.NotFoundError, match="nothing"):
        ss.load_variable(str(tmp_path / "nothing"), "v")
    with pytest.raises(ss.NotFoundError, match="nothing"):
        ss.list_variables(str(tmp_path / "nothing"))
    with pytest.raises(ss.InvalidArgumentError):
        ss.Saver().restore(None)
    np.testing.assert_array_equal(v.value, [1, 1])


@pytest.mark.parametrize("keep", [0, 1, 20, 47, 48, -48, -1])
def test_truncated_index(two_vars, keep, no_hang):
    prefix, a, b = two_vars
    index = Path(prefix + ".index")
    data = index.read_bytes()
    index.write_bytes(data[:keep])
    with pytest.raises(ss.DataLossError) as info:
        ss.Saver([a, b]).restore(prefix)
    assert prefix + ".index" in str(info.value)
    assert_unchanged(a, b)
    with pytest.raises(ss.DataLossError):
        ss.CheckpointReader(prefix)


@pytest.mark.parametrize("size", [48, 100, 4096])
def test_garbage_index(two_vars, size, no_hang):
    prefix, a, b = two_vars
    garbage = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    magic = bytes.fromhex("57fb808b247547db")
    for content in (
        garbage,
        garbage[:-8] + magic,
        b"\x00" * (size - 8) + magic,
        b"\xff" * (size - 8) + magic,
    ):
        Path(prefix + ".index").write_bytes(content)
        with pytest.raises(ss.DataLossError, match="index"):
            ss.Saver([a, b]).restore(prefix)
        assert_unchanged(a, b)


def test_index_with_any_flipped_byte_is_caught(tmp_path, no_hang):
    """Every single-byte change of the index: DataLossError, or (padding and the unused
    metaindex block) the same values; never another exception, a wrong value or a hang."""
    with ss.Graph().as_default():
        ss.Variable("a", np.arange(5, dtype=np.float32))
        ss.Variable("s", np.array([b"x", b"yz"], dtype=object))
        ss.get_variable(
            "emb", [10, 4], initializer=ss.ones_initializer, partitioner=ss.fixed_size_partitioner(3)
        )
        prefix = ss.Saver().save(str(tmp_path / "m"))
    index = Path(prefix + ".index")
    original = index.read_bytes()
    caught = 0
    for xor in (0x01, 0xFF):
        for pos in range(len(original)):
            damaged = bytearray(original)
            damaged[pos] ^= xor
            index.write_bytes(bytes(damaged))
            try:
                reader = ss.CheckpointReader(prefix)
                values = [reader.get_tensor(n) for n in ("a", "s", "emb")]
            except ss.DataLossError as exc:
                assert prefix in str(exc)
                caught += 1
                continue
            assert values[0].tolist() == [0, 1, 2, 3, 4], pos
            assert values[1].tolist() == [b"x", b"yz"], pos
            assert (values[2] == 1).all(), pos
    assert caught >= 2 * (len(original) - 48 - 16)


def test_flipped_data_byte_names_file_tensor_and_checksums(tmp_path):
    with ss.Graph().as_default():
        ss.Variable("a", np.arange(5, dtype=np.float32))
        ss.Variable("big", np.arange(100_000, dtype=np.float32))
        prefix = ss.Saver().save(str(tmp_path / "m"))
        index = ss.CheckpointReader(prefix).get_entries()
    data_file = Path(prefix + DATA_FILE)
    original = data_file.read_bytes()
    for name, where in (("a", 2), ("big", 1000), ("big", 399_999)):
        entry = index.entries[name]
        damaged = bytearray(original)
        damaged[entry.offset + where] ^= 0x20
        data_file.write_bytes(bytes(damaged))
        v = ss.Variable(name, np.zeros(entry.shape, np.float32), register=False)
        with pytest.raises(ss.DataLossError) as info:
            ss.Saver([v]).restore(prefix)
        msg = str(info.value)
        assert str(data_file) in msg and f"'{name}'" in msg, msg
        assert "stored" in msg and ("calculated" in msg or "computed" in msg), msg
        if not entry.block_size:
            assert f"{entry.crc32c:#010x}" in msg
        assert (v.value == 0).all()  # untouched
        with pytest.raises(ss.DataLossError):
            ss.load_variable(prefix, name)
    data_file.write_bytes(original)
    np.testing.assert_array_equal(ss.load_variable(prefix, "big"), np.arange(100_000, dtype=np.float32))


def test_flipped_string_byte_names_file_tensor_and_checksums(tmp_path):
    prefix = save_simple(tmp_path / "m", s=np.array([b"hello", b"world"], dtype=object))
    entry = ss.CheckpointReader(prefix).get_entries().entries["s"]
    data_file = Path(prefix + DATA_FILE)
    damaged = bytearray(data_file.read_bytes())
    damaged[entry.offset + entry.size - 1] ^= 0x01  # a text byte
    data_file.write_bytes(bytes(damaged))
    with pytest.raises(ss.DataLossError) as info:
        ss.load_variable(prefix, "s")
    msg = str(info.value)
    assert "'s'" in msg and f"{entry.crc32c:#010x}" in msg  # passes today
    assert str(data_file) in msg  # fails today


@pytest.mark.parametrize("keep", [0, 10, 30_000])
def test_truncated_data_file(tmp_path, keep):
    prefix = save_simple(
        tmp_path / "m", a=np.arange(5, dtype=np.float32), big=np.arange(100_000, dtype=np.float32)
    )
    data_file = Path(prefix + DATA_FILE)
    data_file.write_bytes(data_file.read_bytes()[:keep])
    big = ss.Variable("big", np.zeros(100_000, np.float32))
    with pytest.raises(ss.DataLossError) as info:
        ss.Saver([big]).restore(prefix)
    assert str(data_file) in str(info.value)
    assert (big.value == 0).all()


def test_truncated_data_file_names_tensor(tmp_path):
    prefix = save_simple(tmp_path / "m", big=np.arange(100_000, dtype=np.float32))
    data_file = Path(prefix + DATA_FILE)
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(ss.DataLossError, match="'big'"):
        ss.load_variable(prefix, "big")


def test_missing_data_file(tmp_path):
    prefix = save_simple(tmp_path / "m", a=np.arange(5, dtype=np.float32))
    os.remove(prefix + DATA_FILE)
    with pytest.raises(ss.ShardsaveError) as info:
        ss.load_variable(prefix, "a")
    assert prefix + DATA_FILE in str(info.value)


def test_var_list_with_two_variables_of_one_name():
    a = ss.Variable("x", np.ones(2))
    with ss.Graph().as_default():
        b = ss.Variable("x", np.zeros(2))
    with pytest.raises(ss.InvalidArgumentError, match="'x'"):
        ss.Saver([a, b])


def test_save_uninitialized_variable_writes_nothing(tmp_path):
    prefix = save_simple(tmp_path / "m", ready=np.ones(2))  # an older checkpoint at the prefix
    ready = ss.Variable("ready", np.full(2, 5.0))
    ss.get_variable("not_ready", shape=[3])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ss.FailedPreconditionError) as info:
        ss.Saver().save(prefix)
    assert "'not_ready'" in str(info.value) and prefix in str(info.value)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # old checkpoint untouched
    np.testing.assert_array_equal(ss.load_variable(prefix, "ready"), np.ones(2))

    fresh = tmp_path / "fresh"
    with pytest.raises(ss.FailedPreconditionError):
        ss.Saver().save(str(fresh / "m"))
    assert not (fresh / "m.index").exists()
    assert not fresh.exists() or not any(fresh.iterdir())
    np.testing.assert_array_equal(ready.value, [5, 5])


@pytest.mark.parametrize(
    "dtype",
    [
        np.dtype("datetime64[s]"),
        np.dtype("timedelta64[ms]"),
        np.dtype([("x", "<f4"), ("y", "<i4")]),
        np.dtype("V4"),
    ],
)
def test_unsupported_dtype_rejected_before_writing(tmp_path, dtype):
    prefix = save_simple(tmp_path / "m", ok=np.ones(2))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    ss.Variable("ok", np.ones(2))
    ss.Variable("odd", np.zeros(3, dtype=dtype))
    with pytest.raises(ss.InvalidArgumentError) as info:
        ss.Saver().save(prefix)
    msg = str(info.value)
    assert "'odd'" in msg and str(dtype) in msg
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(ss.InvalidArgumentError):
        ss.Saver().save(str(tmp_path / "new" / "m"))
    assert not (tmp_path / "new").exists()


def test_object_array_of_non_bytes_is_invalid_argument(tmp_path):
    ss.Variable("objs", np.array([1, 2], dtype=object))
    with pytest.raises(ss.InvalidArgumentError, match="'objs'"):
        ss.Saver().save(str(tmp_path / "m"))


def test_object_array_of_non_bytes_leaves_previous_checkpoint(tmp_path):
    prefix = save_simple(tmp_path / "m", ok=np.ones(2))
    ss.Variable("ok", np.ones(2))
    ss.Variable("objs", np.array([1, 2], dtype=object))
    with pytest.raises(ss.InvalidArgumentError, match="'objs'"):
        ss.Saver().save(prefix)
    np.testing.assert_array_equal(ss.load_variable(prefix, "ok"), np.ones(2))


def test_failed_restore_changes_nothing(tmp_path):
    """The second of two variables is damaged: the first keeps its old value, and an
    uninitialized one stays uninitialized."""
    prefix = save_simple(tmp_path / "m", a=np.arange(3, dtype=np.float32), b=np.arange(4, dtype=np.float32))
    entry = ss.CheckpointReader(prefix).get_entries().entries["b"]
    data_file = Path(prefix + DATA_FILE)
    damaged = bytearray(data_file.read_bytes())
    damaged[entry.offset + 1] ^= 0x01
    data_file.write_bytes(bytes(damaged))
    a = ss.Variable("a", np.full(3, 7.0, np.float32))
    b = ss.Variable("b", np.full(4, 7.0, np.float32))
    fresh = ss.get_variable("a2", shape=[3])
    with pytest.raises(ss.DataLossError, match="'b'"):
        ss.Saver([a, b]).restore(prefix)
    np.testing.assert_array_equal(a.value, [7, 7, 7])
    np.testing.assert_array_equal(b.value, [7, 7, 7, 7])
    with pytest.raises(ss.DataLossError):
        ss.Saver({"a": fresh, "b": b}).restore(prefix)
    assert not fresh.initialized
    ss.Saver({"a": fresh}).restore(prefix)  # the undamaged one alone restores
    np.testing.assert_array_equal(fresh.value, [0, 1, 2])


def test_failed_restore_with_wrong_shape_or_missing_second_changes_nothing(two_vars):
    prefix, a, b = two_vars
    with pytest.raises(ss.InvalidArgumentError):
        ss.Saver({"a": a, "b": ss.Variable("b3", np.zeros(3, np.int32), register=False)}).restore(prefix)
    with pytest.raises(ss.NotFoundError):
        ss.Saver({"a": a, "zz": b}).restore(prefix)
    assert_unchanged(a, b)
    ss.Saver([a, b]).restore(prefix)
    np.testing.assert_array_equal(a.value, [1, 2, 3])
    np.testing.assert_array_equal(b.value, [[0, 1], [2, 3]])


def test_total_param_count_of_inspect(two_vars, capsys):
    prefix, _, _ = two_vars
    ss.print_tensors_in_checkpoint_file(prefix, tensor_name="", all_tensors=False, all_tensor_names=True)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"# Total number of params: {3 + math.prod([2, 2])}"


def test_damaged_slice_entry_with_valid_table_checksums_is_data_loss(tmp_path):
    """Slice entries are decoded lazily; damage found then is still a DataLossError."""
    from shardsave.format import table

    ss.reset_default_graph()
    prefix = str(tmp_path / "m")
    ss.get_variable("emb", [6, 2], initializer=ss.ones_initializer, partitioner=ss.fixed_size_partitioner(2))
    ss.Saver().save(prefix)
    with open(prefix + ".index", "rb") as f:
        pairs = table.read_table(f.read())
    # the first slice entry's value: a shape field sent as a varint (valid table, bad proto)
    pairs = [(k, b"\x08\x01\x12\x02\x10\x05") if i == 1 else (k, v) for i, (k, v) in enumerate(pairs)]
    assert pairs[1][0][:1] == b"\x00"
    with open(prefix + ".index", "wb") as f:
        f.write(table.build_table(pairs))
    with pytest.raises(ss.DataLossError, match=r"m\.index is damaged"):
        ss.load_variable(prefix, "emb")


@pytest.mark.parametrize("in_place", [True, False])
def test_reshard_by_rows_reads_in_place_and_checks_the_blocks_around_each_region(tmp_path, in_place):
    """Into the variables' arrays (in_place.py) or into new arrays, each region is read
    straight into its array, with the partial checksum blocks around it in side buffers."""
    full = np.arange(3000 * 1024, dtype=np.float32).reshape(3000, 1024)  # rows of 4 KiB

    def blocks(n):
        rows = np.linspace(0, 3000, n + 1).astype(int)
        return [
            ss.Variable("w", full[a:b].copy(), global_shape=full.shape, offset=(a, 0), register=False)
            for a, b in zip(rows[:-1], rows[1:], strict=True)
        ]

    prefix = ss.Saver({"w": blocks(2)}).save(str(tmp_path / "m"))
    targets = [
        ss.Variable(
            "w", np.zeros((b - a, 1024), np.float32), global_shape=full.shape, offset=(a, 0), register=False
        )
        for a, b in ((0, 1000), (1000, 2000), (2000, 3000))
    ]
    saver = ss.Saver({"w": targets}, restore_in_place=in_place)
    saver.restore(prefix)
    for t in targets:
        np.testing.assert_array_equal(t.value, full[t.offset[0] : t.offset[0] + t.shape[0]])
    # read in place: no more than the regions plus one checksum block around each
    stats = saver.last_restore_stats
    assert full.nbytes <= stats.bytes_read <= full.nbytes + 4 * 65536

    pieces = ss.CheckpointReader(prefix).get_entries().pieces["w"]
    first = pieces[((0, 1500), (0, 1024))]
    data_file = Path(prefix + DATA_FILE)
    original = data_file.read_bytes()
    # row 1000 starts inside a checksum block: damage that block just before the region
    # (read into a side buffer) and inside the region (read into the variable); blocks are
    # checked 16 at a time from block 62 on, so block 78 is the first of a run
    for where in (1000 * 4096 - 8, 1000 * 4096 + 8, 78 * 65536 + 8, 1400 * 4096):
        damaged = bytearray(original)
        damaged[first.offset + where] ^= 0x01
        data_file.write_bytes(bytes(damaged))
        fresh = [
            ss.Variable(
                "w",
                np.zeros((1000, 1024), np.float32),
                global_shape=full.shape,
                offset=(a, 0),
                register=False,
            )
            for a in (0, 1000, 2000)
        ]
        block = first.offset + where // 65536 * 65536
        with pytest.raises(
            ss.DataLossError, match=rf"checksum does not match for tensor 'w' \(bytes {block}\.\.\)"
        ):
            ss.Saver({"w": fresh}, restore_in_place=in_place).restore(prefix)
        assert all((v.value == 0).all() for v in fresh)  # untouched
    data_file.write_bytes(original)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    np.bool_,
                    np.int8,
                    np.uint16,
                    np.float16,
                    np.float32,
                    np.float64,
                    np.complex128,
                    ml_dtypes.bfloat16,
                ]
            ),
            st.sampled_from([(), (0,), (1,), (3,), (2, 5), (7, 1, 3), (300,)]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_many_small_mixed_variables_round_trip_as_aligned_writable_arrays(tmp_path, specs):
    """Small tensors of every width packed back to back (odd offsets included) come back
    bit-exact, with their dtype and shape, aligned and writable, as views or as copies."""
    rng = np.random.default_rng(len(specs))
    values = {
        f"v{i:02d}": (rng.standard_normal(shape) * 100).astype(dt) for i, (dt, shape) in enumerate(specs)
    }
    prefix = tmp_path / f"m{rng.integers(1 << 40)}"
    save_simple(prefix, **values)
    with ss.Graph().as_default():
        restored = [ss.Variable(name, np.zeros_like(v)) for name, v in values.items()]
        ss.Saver(restored).restore(str(prefix))
    for var in restored:
        got, want = var.value, values[var.name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), var.name
        assert got.tobytes() == want.tobytes(), var.name
        assert got.flags.aligned and got.flags.writeable, var.name


def test_a_durable_save_starts_writing_back_early_and_stops_doing_so(tmp_path, monkeypatch):
    """Past storage.local.EARLY_WRITEBACK_BYTES a thread fdatasyncs the data file while it is
    written; it is gone once the save returns."""
    from shardsave import storage

    calls = []
    real = os.fdatasync

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(storage.local.os, "fdatasync", counting)
    v = ss.Variable("v", np.arange(8 << 20, dtype=np.float32), register=False)  # 32 MiB
    ss.Saver([v]).save(str(tmp_path / "m"))
    assert calls
    assert not [t for t in threading.enumerate() if t.name == "shardsave-writeback"]
    calls.clear()
    ss.Saver([v], fsync=False).save(str(tmp_path / "n"))
    assert not calls  # only durable saves


def test_a_writeback_error_met_early_fails_the_save_and_commits_nothing(tmp_path, monkeypatch):
    """The kernel reports a writeback error once per open file: the error the early
    writeback thread meets must fail the save itself, naming the file, with no index."""
    from shardsave import storage

    v = ss.Variable("v", np.arange(8 << 20, dtype=np.float32), register=False)
    saver = ss.Saver([v])
    saver.save(str(tmp_path / "m"), global_step=1)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage.local.os, "fdatasync", failing)
    with pytest.raises(OSError, match=r"m-2\.data-00000-of-00001.*Input/output error"):
        saver.save(str(tmp_path / "m"), global_step=2)
    monkeypatch.undo()
    assert not (tmp_path / "m-2.index").exists()
    assert ss.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-1")
    assert not [t for t in threading.enumerate() if t.name == "shardsave-writeback"]
    assert saver.save(str(tmp_path / "m"), global_step=3) == str(tmp_path / "m-3")


# ------------------------------------------- bookkeeping rules a mutation once got past
def test_latest_checkpoint_falls_back_to_the_newest_committed_one(tmp_path):
    """The newest listed checkpoint lost its index: the one before it is the latest, not
    the oldest on the list (the candidates are tried newest first)."""
    ss.Variable("v", np.ones(2))
    saver = ss.Saver(max_to_keep=5)
    prefixes = [saver.save(str(tmp_path / "m"), global_step=i) for i in range(4)]
    os.remove(prefixes[3] + ".index")
    assert ss.latest_checkpoint(str(tmp_path)) == prefixes[2]
    os.remove(prefixes[2] + ".index")
    assert ss.latest_checkpoint(str(tmp_path)) == prefixes[1]
    os.remove(prefixes[1] + ".index")
    os.remove(prefixes[0] + ".index")
    assert ss.latest_checkpoint(str(tmp_path)) is None


def test_recover_last_checkpoints_orders_them_by_mtime(tmp_path):
    """Given out of order, the adopted checkpoints are ordered oldest first by the mtime
    of their index, so retention deletes the oldest. (TensorFlow keeps the order given;
    shardsave sorts, so a list from a directory listing cannot delete the newest.)"""
    ss.Variable("v", np.ones(2))
    first = ss.Saver(max_to_keep=None)
    a, b, c = (first.save(str(tmp_path / "m"), global_step=i) for i in range(3))
    for prefix, mtime in ((a, 1_000_000.0), (b, 2_000_000.0), (c, 3_000_000.0)):
        os.utime(prefix + ".index", (mtime, mtime))
    restarted = ss.Saver(max_to_keep=3)
    restarted.recover_last_checkpoints([c, a, b])
    assert restarted.last_checkpoints == [a, b, c]
    new = restarted.save(str(tmp_path / "m"), global_step=3)
    assert restarted.last_checkpoints == [b, c, new]
    assert not os.path.exists(a + ".index")  # the oldest by mtime went, not the first given
    assert os.path.exists(c + ".index") and os.path.exists(b + ".index")
    state = ss.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_paths == [b, c, new]
    assert state.all_model_checkpoint_timestamps[:2] == [2_000_000.0, 3_000_000.0]


def test_keep_checkpoint_every_n_hours_keeps_only_strictly_newer(tmp_path, monkeypatch):
    """TF's rule at its boundary (N = 1 hour, Saver made at t=0, max_to_keep=1): a
    checkpoint leaving the window is kept only when strictly newer than the next
    preservation time. The fake clock is ``time.time`` itself, not a module's alias, so
    the rule is tested wherever the Saver computes it."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(time, "time", lambda: clock.now)
    ss.Variable("v", np.ones(2))
    saver = ss.Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
    # step 1 at exactly 3600 (the next preservation time) is deleted when it leaves the
    # window; step 2 (5000 > 3600) is kept and moves the time on by exactly 3600 s, to
    # 7200; step 3 at exactly 7200 is deleted again, step 4 (7200.5) is kept; 5 is the window
    for step, now in ((1, 3600.0), (2, 5000.0), (3, 7200.0), (4, 7200.5), (5, 9000.0)):
        clock.now = now
        saver.save(str(tmp_path / "m"), global_step=step)
    monkeypatch.undo()
    assert {n for n in files(tmp_path) if n.endswith(".index")} == {"m-2.index", "m-4.index", "m-5.index"}
    state = ss.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_paths == [str(tmp_path / "m-5")]
    assert state.last_preserved_timestamp == 7200.5


def test_state_file_paths_of_another_filesystem_are_kept_whole(tmp_path):
    """A state file in a local directory naming a URL (or an absolute path) gives it back
    as written, not joined to the directory."""
    ss.update_checkpoint_state(
        str(tmp_path), "memory://elsewhere/m-2", ["/abs/m-1", "memory://elsewhere/m-2"]
    )
    state = ss.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == "memory://elsewhere/m-2"
    assert state.all_model_checkpoint_paths == ["/abs/m-1", "memory://elsewhere/m-2"]
