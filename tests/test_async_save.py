"""Non-blocking saves: values as at the call, errors handed back, joined at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shardsave as ss
from shardsave import storage


@pytest.fixture(autouse=True)
def fresh_graph():
    ss.reset_default_graph()


def test_saves_values_as_they_were_at_the_call(tmp_path):
    big = ss.Variable("big", np.arange(3_000_000, dtype=np.float32))  # 12 MB: several chunks
    small = ss.Variable("small", np.ones(4))
    saver = ss.Saver()
    handle = saver.save(str(tmp_path / "m"), global_step=1, blocking=False)
    big.value[:] = -1  # training goes on and changes the arrays in place
    small.assign(np.zeros(4))
    assert handle.result(timeout=60) == str(tmp_path / "m-1")
    assert np.array_equal(ss.load_variable(str(tmp_path), "big"), np.arange(3_000_000, dtype=np.float32))
    assert np.array_equal(ss.load_variable(str(tmp_path), "small"), np.ones(4))


def test_staging_buffers_are_reused_between_saves(tmp_path):
    v = ss.Variable("v", np.arange(1000.0))
    saver = ss.Saver()
    saver.save(str(tmp_path / "m"), global_step=1, blocking=False).result()
    first = saver._staging._buffers[("v", (0,))]
    v.assign(v.value + 1)
    saver.save(str(tmp_path / "m"), global_step=2, blocking=False).result()
    assert saver._staging._buffers[("v", (0,))] is first
    assert np.array_equal(ss.load_variable(str(tmp_path / "m-2"), "v"), np.arange(1000.0) + 1)


def test_repeated_saves_copy_into_the_same_buffers_and_save_the_values_at_each_call(tmp_path):
    vs = [ss.Variable(f"v{i}", np.full(16, float(i))) for i in range(50)]
    saver = ss.Saver()
    saver.save(str(tmp_path / "m"), global_step=0, blocking=False).result()
    buffers = list(saver._staging._aligned)
    for step in (1, 2, 3):
        for i, v in enumerate(vs):
            v.assign(np.full(16, float(100 * step + i)))  # a new array, same shape
        handle = saver.save(str(tmp_path / "m"), global_step=step, blocking=False)
        for v in vs:
            v.value[:] = -7  # changed right after the call: the save has its own copy
        assert handle.result(timeout=60) == str(tmp_path / f"m-{step}")
        assert all(a is b for a, b in zip(saver._staging._aligned, buffers, strict=True))
        for i, v in enumerate(vs):
            stored = ss.load_variable(str(tmp_path / f"m-{step}"), v.name)
            np.testing.assert_array_equal(stored, np.full(16, float(100 * step + i)))


def test_error_is_raised_by_result_and_nothing_is_committed(tmp_path, monkeypatch):
    ss.Variable("v", np.arange(10.0))
    saver = ss.Saver()
    saver.save(str(tmp_path / "m"), global_step=1)

    def broken(self, buffer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.Writer, "write", broken)
    handle = saver.save(str(tmp_path / "m"), global_step=2, blocking=False)
    with pytest.raises(OSError, match="No space left on device"):
        handle.result(timeout=60)
    monkeypatch.undo()
    assert not (tmp_path / "m-2.index").exists()
    assert ss.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-1")
    saver.wait_until_finished()  # the error was seen through the handle: not raised twice


def test_unseen_error_is_raised_by_the_next_save(tmp_path, monkeypatch):
    ss.Variable("v", np.arange(10.0))
    saver = ss.Saver()
    monkeypatch.setattr(
        storage.Writer, "write", lambda self, b: (_ for _ in ()).throw(OSError(5, "I/O error"))
    )
    saver.save(str(tmp_path / "m"), global_step=1, blocking=False)
    with pytest.raises(OSError, match="I/O error"):
        saver.save(str(tmp_path / "m"), global_step=2)
    monkeypatch.undo()
    assert saver.save(str(tmp_path / "m"), global_step=3) == str(tmp_path / "m-3")


def test_restore_waits_for_the_pending_save(tmp_path):
    v = ss.Variable("v", np.arange(2_000_000, dtype=np.float64))
    saver = ss.Saver()
    saver.save(str(tmp_path / "m"), blocking=False)
    v.assign(np.zeros(2_000_000))
    saver.restore(str(tmp_path / "m"))
    assert np.array_equal(v.value, np.arange(2_000_000, dtype=np.float64))


def test_interpreter_exit_finishes_the_save(tmp_path):
    script = textwrap.dedent(
        f"""
        import numpy as np, shardsave as ss
        ss.Variable("v", np.arange(4_000_000, dtype=np.float32))
        ss.Saver().save({str(tmp_path / "m")!r}, global_step=7, blocking=False)
        # no wait: the interpreter exits right away
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert os.path.exists(tmp_path / "m-7.index")
    assert ss.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-7")
    assert np.array_equal(ss.load_variable(str(tmp_path), "v"), np.arange(4_000_000, dtype=np.float32))


def test_failed_save_at_exit_is_reported(tmp_path):
    script = textwrap.dedent(
        f"""
        import numpy as np, shardsave as ss
        from shardsave import storage
        def broken(self, buffer):
            raise OSError(28, "No space left on device")
        storage.Writer.write = broken
        ss.Variable("v", np.arange(10.0))
        ss.Saver().save({str(tmp_path / "m")!r}, blocking=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "background save failed" in proc.stderr and "No space left on device" in proc.stderr
    assert not os.path.exists(tmp_path / "m.index")


@pytest.mark.parametrize("blocking", [True, False])
def test_a_string_tensor_changing_between_saves_is_saved_new_and_checked_again(tmp_path, blocking):
    """The layout keeps the plan while shapes stay (the manager's metadata changes every
    save): the new contents are saved, and a non-string element is still refused."""
    names = ss.Variable("names", np.array([b"a", b"bb"], dtype=object), register=False)
    w = ss.Variable("w", np.arange(4, dtype=np.float32), register=False)
    saver = ss.Saver([names, w])
    for step, values in enumerate(([b"a", b"bb"], [b"longer value", b""], ["text", b"\x00"])):
        names.assign(np.array(values, dtype=object))
        handle = saver.save(str(tmp_path / "ckpt"), global_step=step, blocking=blocking)
        if not blocking:
            handle.result()
        got = ss.CheckpointReader(str(tmp_path / f"ckpt-{step}")).get_tensor("names")
        assert [v.encode() if isinstance(v, str) else v for v in values] == list(got)
    names.assign(np.array([b"ok", 3], dtype=object))
    with pytest.raises(ss.errors.InvalidArgumentError, match="element 1 is int"):
        saver.save(str(tmp_path / "ckpt"), global_step=9, blocking=blocking)
