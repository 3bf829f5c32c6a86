"""ss.CheckpointManager: its retention policy (pure), one process's save / restore /
fallback / preemption / metadata, and real mpiexec jobs on local files and on the S3
server (preempted by SIGTERM to one rank, resumed on other numbers of ranks, retention
across processes, a damaged newest checkpoint falling back to the previous one)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import time

import numpy as np
import pytest
from faults.common import run_mpi

import shardsave as ss
from shardsave import storage
from shardsave.format.names import METADATA_NAME
from shardsave.manager.policy import Entry, Policy, keep

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "manager", "train.py")
_spec = importlib.util.spec_from_file_location("manager_train", TRAIN)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


@pytest.fixture(autouse=True)
def fresh_graph():
    ss.reset_default_graph()


def names_in(directory: str, options: dict | None = None) -> list[str]:
    return sorted(storage.files_in(storage.resolve(directory, options)))


def ckpts(directory: str, options: dict | None = None) -> list[int]:
    return sorted(int(n[5:-6]) for n in names_in(directory, options) if n.endswith(".index"))


def flip_byte(loc: storage.Location, at: int = 10) -> None:
    data = bytearray(storage.read_bytes(loc))
    data[at] ^= 0xFF
    storage.publish(loc, bytes(data))


# ------------------------------------------------------------------------ policy
def entries(*steps_metrics, t0=1000.0, dt=60.0):
    return [Entry(s, f"d/ckpt-{s}", t0 + i * dt, m) for i, (s, m) in enumerate(steps_metrics)]


def test_policy_keeps_the_newest_max_to_keep():
    es = entries(*[(s, {}) for s in (1, 2, 3, 4)])
    out = keep(Policy(max_to_keep=2), es[::-1], last_preserved=0.0)  # any order in
    assert [e.step for e in out.kept] == [3, 4] and [e.step for e in out.doomed] == [1, 2]
    assert keep(Policy(max_to_keep=None), es, 0.0).kept == es


def test_policy_preserves_every_n_hours_as_tf2():
    # one every 30 min; keep one an hour: TF2 preserves a dropped one whose timestamp is
    # at least an hour after the last one preserved
    es = entries(*[(s, {}) for s in range(6)], t0=3600.0, dt=1800.0)
    out = keep(Policy(max_to_keep=1, every_n_hours=1.0), es, last_preserved=0.0)
    assert [e.step for e in out.kept] == [5]
    assert [e.step for e in out.preserved] == [0, 2, 4]
    assert [e.step for e in out.doomed] == [1, 3]
    assert out.last_preserved == es[4].timestamp


@pytest.mark.parametrize("mode, best", [("min", [2, 4]), ("max", [1, 3])])
def test_policy_best_n_keeps_the_best_and_the_newest(mode, best):
    loss = {1: 5.0, 2: 1.0, 3: 9.0, 4: 2.0, 5: float("nan")}
    es = entries(*[(s, {"loss": v}) for s, v in loss.items()], (6, {}), (7, {"loss": 4.0}))
    out = keep(Policy(max_to_keep=2, best_metric="loss", best_mode=mode), es, 0.0)
    assert [e.step for e in out.kept] == sorted(best + [7])  # the newest always stays
    # without the metric (or NaN) a checkpoint ranks below every one with it
    out = keep(Policy(max_to_keep=3, best_metric="acc"), es, 0.0)
    assert [e.step for e in out.kept] == [5, 6, 7]  # ties: the newer


def test_policy_checks_its_arguments():
    for bad in (dict(max_to_keep=0), dict(best_mode="lowest"), dict(every_n_hours=-1.0)):
        with pytest.raises(ss.InvalidArgumentError):
            Policy(**bad)


# ------------------------------------------------------------- one process
def test_loop_layout_metadata_and_tensorflow(tmp_path, caplog):
    d = str(tmp_path / "run")
    w = ss.Variable("w", np.zeros(4))
    caplog.set_level(logging.INFO, logger="shardsave")
    with ss.CheckpointManager(d, [w], max_to_keep=2, save_interval_steps=3) as mgr:
        assert mgr.restore_or_initialize() is None
        handles = []
        for step in range(10):
            w.assign(np.full(4, float(step)))
            if mgr.should_save(step):
                handles.append(
                    mgr.save(step, metrics={"loss": np.float32(step)}, metadata={"epoch": step // 4})
                )
                w.value[:] = -1  # changed right after the call: the save has its own copy
            assert not mgr.reached_preemption(step)
        assert all(isinstance(h, ss.SaveHandle) for h in handles) and len(handles) == 4
        assert mgr.all_steps() == [6, 9] and mgr.latest_step() == 9
        assert mgr.metadata(6) == {"epoch": 1}
        assert not mgr.should_save(9)  # saved already
    assert ckpts(d) == [6, 9] and "checkpoint" in names_in(d)
    assert np.array_equal(ss.load_variable(f"{d}/ckpt-9", "w"), np.full(4, 9.0))
    meta = ss.read_metadata(f"{d}/ckpt-9")
    assert meta == {"epoch": 2, "shardsave.manager": {"metrics": {"loss": 9.0}}}
    saves = [r.getMessage() for r in caplog.records if "CheckpointManager: saved" in r.getMessage()]
    deletes = [r.getMessage() for r in caplog.records if "retention deleted" in r.getMessage()]
    assert len(saves) == 4 and len(deletes) == 2 and f"{d}/ckpt-0" in deletes[0]

    tf = pytest.importorskip("tensorflow")
    assert tf.train.latest_checkpoint(d) == f"{d}/ckpt-9"
    reader = tf.train.load_checkpoint(f"{d}/ckpt-9")
    assert json.loads(reader.get_tensor(METADATA_NAME))["epoch"] == 2
    assert np.array_equal(reader.get_tensor("w"), np.full(4, 9.0))
    # TF2's own manager takes over the directory where this one left it
    tf_mgr = tf.train.CheckpointManager(tf.train.Checkpoint(), d, max_to_keep=2)
    assert tf_mgr.checkpoints == [f"{d}/ckpt-6", f"{d}/ckpt-9"]


def test_saver_metadata_round_trip_and_refusals(tmp_path):
    w = ss.Variable("w", np.arange(3.0))
    saver = ss.Saver([w])
    meta = {"step": 3, "config": {"lr": 0.1, "layers": [1, 2]}, "name": "ü", "np": np.int64(4)}
    p = saver.save(str(tmp_path / "m"), 3, metadata=meta)
    assert ss.read_metadata(p) == {**meta, "np": 4}
    assert ss.read_metadata(saver.save(str(tmp_path / "m"), 4)) is None  # saved without
    assert saver.save(str(tmp_path / "m"), 5, metadata={"a": 1}, blocking=False).result()
    assert ss.read_metadata(str(tmp_path)) == {"a": 1}  # a directory: its latest
    with pytest.raises(ss.InvalidArgumentError, match="not JSON-serialisable"):
        saver.save(str(tmp_path / "m"), 6, metadata={"f": object()})
    with pytest.raises(ss.InvalidArgumentError, match="must be a dict"):
        saver.save(str(tmp_path / "m"), 6, metadata=[1])
    assert not ss.checkpoint_exists(str(tmp_path / "m-6"))
    saver.restore(p)  # the extra tensor does not disturb a restore
    with pytest.raises(ss.InvalidArgumentError, match="reserved"):
        ss.Saver({METADATA_NAME: ss.Variable("x", np.ones(1), register=False)})
    # files are untrusted: metadata that is not a JSON object is DataLossError
    from shardsave.metadata import decode

    for raw in (
        np.array(b"[1]", dtype=object),
        np.array(b"{", dtype=object),
        np.array([b"{}"], dtype=object),
    ):
        with pytest.raises(ss.DataLossError, match=METADATA_NAME):
            decode(raw, "p")


def test_damaged_newest_falls_back_and_none_restores(tmp_path, caplog):
    d = str(tmp_path)
    w = ss.Variable("w", np.zeros(8))
    with ss.CheckpointManager(d, [w], max_to_keep=3) as mgr:
        for step in (1, 2, 3):
            w.assign(np.full(8, float(step)))
            mgr.save(step, blocking=True)
    flip_byte(storage.resolve(f"{d}/ckpt-3.data-00000-of-00001"), at=-3)  # in w, after the metadata
    os.remove(f"{d}/ckpt-2.data-00000-of-00001")  # incomplete
    w.assign(np.zeros(8))
    caplog.set_level(logging.INFO, logger="shardsave")
    with ss.CheckpointManager(d, [w], max_to_keep=3) as mgr:
        assert mgr.restore_or_initialize() == 1
        assert np.array_equal(w.value, np.full(8, 1.0))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert f"{d}/ckpt-3" in warnings[0] and "DataLossError" in warnings[0] and "checksum" in warnings[0]
        assert f"{d}/ckpt-2" in warnings[1] and "NotFoundError" in warnings[1]
        assert not mgr.should_save(1)  # the step restored is not saved again
        w.assign(np.full(8, 2.0))
        mgr.save(2, blocking=True)  # training goes on from 1: the later, damaged 3 goes
        assert mgr.all_steps() == [1, 2] and ckpts(d) == [1, 2]
    os.remove(f"{d}/ckpt-1.data-00000-of-00001")
    flip_byte(storage.resolve(f"{d}/ckpt-2.data-00000-of-00001"), at=-3)
    w.assign(np.full(8, 7.0))
    with ss.CheckpointManager(d, [w]) as mgr:
        assert mgr.restore_or_initialize() is None
        assert np.array_equal(w.value, np.full(8, 7.0))  # nothing changed
    # a restore error of the caller's own making is raised, not skipped
    with ss.CheckpointManager(d, [ss.Variable("w", np.zeros(3), register=False)]) as mgr:
        mgr.save(5, blocking=True)
    mgr = ss.CheckpointManager(d, [ss.Variable("w", np.zeros(4), register=False)])
    with pytest.raises(ss.InvalidArgumentError, match="shape"):
        mgr.restore_or_initialize()
    mgr.close()
    extra = [ss.Variable("w", np.zeros(3), register=False), ss.Variable("new", np.zeros(1), register=False)]
    with ss.CheckpointManager(d, extra) as mgr, pytest.raises(ss.NotFoundError, match="'new' not found"):
        mgr.restore_or_initialize()  # a variable the checkpoints lack: no fallback, no fresh start
    assert ckpts(d) == [1, 2, 5]
    with pytest.raises(ss.FailedPreconditionError, match="closed"):
        mgr.should_save(6)


def test_retention_and_best_n_across_restarts(tmp_path):
    d = str(tmp_path)
    w = ss.Variable("w", np.zeros(2))
    loss = {0: 5.0, 1: 1.0, 2: 4.0, 3: 2.0, 4: 3.0, 5: 9.0}
    for step, value in loss.items():  # one process per save
        with ss.CheckpointManager(d, [w], max_to_keep=2, best_metric="loss") as mgr:
            mgr.save(step, metrics={"loss": value}, blocking=step % 2 == 0)
    with ss.CheckpointManager(d, [w], max_to_keep=2, best_metric="loss") as mgr:
        assert mgr.all_steps() == [1, 3, 5] and mgr.best_step() == 1
        assert mgr.latest_step() == 5
    assert ckpts(d) == [1, 3, 5]
    # without best_metric the same directory keeps its newest two
    with ss.CheckpointManager(d, [w], max_to_keep=2, best_metric="loss", best_mode="max") as mgr:
        mgr.save(6, metrics={"loss": 0.5})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 5, 6] and mgr.best_step() == 5
    with ss.CheckpointManager(d, [w], max_to_keep=2) as mgr:
        assert mgr.best_step() is None
        mgr.save(7)
    assert ckpts(d) == [6, 7]


def test_restart_adopts_committed_checkpoints_the_state_file_misses(tmp_path):
    d = str(tmp_path)
    w = ss.Variable("w", np.zeros(2))
    with ss.CheckpointManager(d, [w], max_to_keep=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step)
    # a save that died between its commit and the state file: the file lists 1 and 2 only
    ss.update_checkpoint_state(d, f"{d}/ckpt-2", [f"{d}/ckpt-1", f"{d}/ckpt-2"])
    # a checkpoint preserved off the list (keep_checkpoint_every_n_hours) is never deleted
    with ss.CheckpointManager(d, [w], max_to_keep=3) as mgr:
        assert mgr.all_steps() == [1, 2, 3]
        assert mgr.restore_or_initialize() == 3
        mgr.save(4)
    assert ckpts(d) == [2, 3, 4]
    ss.update_checkpoint_state(d, f"{d}/ckpt-4", [f"{d}/ckpt-3", f"{d}/ckpt-4"])
    with ss.CheckpointManager(d, [w], max_to_keep=1) as mgr:
        assert mgr.all_steps() == [3, 4]
        mgr.save(5)
    assert ckpts(d) == [2, 5]  # 2 was off the list: left alone


def test_keep_every_n_hours_survives_a_restart(tmp_path):
    d = str(tmp_path)
    w = ss.Variable("w", np.zeros(2))
    hours = 2.5 / 3600  # 2.5 s; a fresh manager's clock starts 1 s before it (as TF2's)
    with ss.CheckpointManager(d, [w], max_to_keep=1, keep_checkpoint_every_n_hours=hours) as mgr:
        mgr.save(0, blocking=True)
        time.sleep(1.6)
        mgr.save(1, blocking=True)  # 0 leaves the list, less than 2.5 s after the start: deleted
        mgr.save(2, blocking=True)  # 1 leaves it 2.6 s after the start: preserved
    assert ckpts(d) == [1, 2]
    state = ss.get_checkpoint_state(d)
    assert state.all_model_checkpoint_paths == [f"{d}/ckpt-2"] and state.last_preserved_timestamp > 0
    with ss.CheckpointManager(d, [w], max_to_keep=1, keep_checkpoint_every_n_hours=hours) as mgr:
        assert mgr.all_steps() == [2]
        mgr.save(3, blocking=True)  # 2 is within 2.5 s of 1, the last preserved: deleted
    assert ckpts(d) == [1, 3]


def test_preemption_signal_interval_and_handlers(tmp_path):
    previous = []
    signal.signal(signal.SIGUSR1, lambda s, f: previous.append(s))
    app_handler = signal.getsignal(signal.SIGUSR1)
    try:
        w = ss.Variable("w", np.zeros(2))
        with ss.CheckpointManager(str(tmp_path), [w], save_interval_steps=10) as mgr:
            assert mgr.should_save(0) and not mgr.should_save(3)
            assert not mgr.reached_preemption(3)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert previous == [signal.SIGUSR1]  # chained to the application's handler
            assert mgr.should_save(4) and mgr.reached_preemption(4)
            mgr.save(4)
            assert not mgr.should_save(4)  # not twice
            assert mgr.reached_preemption(5) and not mgr.should_save(5)  # one save per notice
            assert mgr.should_save(10)  # the interval still holds
            mgr.wait_until_finished()
            assert mgr.all_steps() == [4]
        assert signal.getsignal(signal.SIGUSR1) is app_handler
        assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_arguments_are_checked(tmp_path):
    w = ss.Variable("w", np.zeros(2))
    for bad in (dict(save_interval_steps=0), dict(checkpoint_name="a/b"), dict(max_to_keep=-1)):
        with pytest.raises(ss.InvalidArgumentError):
            ss.CheckpointManager(str(tmp_path), [w], **bad)
    with ss.CheckpointManager(str(tmp_path), [w]) as mgr:
        with pytest.raises(ss.InvalidArgumentError, match="reserved"):
            mgr.save(1, metadata={"shardsave.manager": 1})
        with pytest.raises(ss.InvalidArgumentError, match="JSON"):
            mgr.save(1, metrics={"loss": object()}, blocking=True)
        with pytest.raises(ss.InvalidArgumentError, match="step"):
            mgr.should_save(-1)
        with pytest.raises(ss.InvalidArgumentError, match="state"):
            mgr.save(1, state={"w": np.ones(2)})
        assert mgr.all_steps() == []
        mgr.save(1, blocking=True)
        saver = mgr.saver
    with pytest.raises(ss.FailedPreconditionError):
        saver.save(str(tmp_path / "x"))  # closed with the manager that made it
    # a Saver given to the manager is used as it is, and left open
    mine = ss.Saver([w])
    with ss.CheckpointManager(str(tmp_path), mine, checkpoint_name="other") as mgr:
        mgr.save(2, blocking=True)
        assert mgr.all_steps() == [2]
    assert mine.save(str(tmp_path / "y")) == str(tmp_path / "y")


def test_non_blocking_saver_retention_deletes_on_local_files(tmp_path):
    w = ss.Variable("w", np.zeros(2))
    saver = ss.Saver([w], max_to_keep=1)
    for step in (1, 2, 3):
        saver.save(str(tmp_path / "m"), step, blocking=False)
    saver.wait_until_finished()
    assert [n for n in names_in(str(tmp_path)) if n.endswith(".index")] == ["m-3.index"]


# ---------------------------------------------------------------- under mpiexec
def launch(n: int, directory: str, env: dict, *args: str) -> list[dict]:
    env = dict(env, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")]))
    proc = run_mpi(n, [TRAIN, "--dir", directory, *args], env=env, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out[-6000:]
    ranks = json.loads(lines[0][len("RESULT ") :])
    assert [r["rank"] for r in ranks] == list(range(n))
    for r in ranks:
        assert r.get("handler_restored", "pending" in r), r
        assert {k: v for k, v in r.items() if k not in ("rank", "chained")} == {
            k: v for k, v in ranks[0].items() if k not in ("rank", "chained")
        }, ranks  # every rank saw the same
    return ranks, out


def check_values(directory: str, options: dict | None, step: int) -> None:
    prefix = f"{directory}/ckpt-{step}"
    reader = ss.CheckpointReader(prefix, storage_options=options)
    assert np.array_equal(reader.get_tensor("w"), train.value(step))
    assert int(reader.get_tensor("step")) == step


def test_preempt_resume_retain_and_fall_back_under_mpiexec(where):
    """Four launches on one directory, 4 -> 2 -> 3 -> 1 ranks, local or on S3."""
    d, options, env = where
    # 1. four ranks; the last gets SIGTERM during step 7: every rank saves step 8 (not a
    #    multiple of the interval, 3) and leaves the loop; non-blocking saves throughout
    ranks, out = launch(4, d, env, "--steps", "20", "--kill-at", "7")
    r = ranks[0]
    assert r["preempted_at"] == 8 and r["saved"] == [0, 3, 6, 8] and r["handles"] == ["SaveHandle"]
    assert [x["chained"] for x in ranks] == [[], [], [], [signal.SIGTERM]]
    assert ckpts(d, options) == [6, 8] == r["all_steps"]
    check_values(d, options, 8)
    assert "preemption notice agreed by every rank at step 8" in out
    # 2. two ranks resume from it (resharded), save 9 and 12 and exit with 12 still being
    #    saved: the interpreter's exit finishes it
    ranks, out = launch(2, d, env, "--steps", "14", "--exit-pending")
    assert ranks[0]["start"] == 8 and ranks[0]["restored_ok"] is True
    assert ranks[0]["saved"] == [9, 12] and ranks[0]["pending"] == 12
    assert ckpts(d, options) == [9, 12]
    check_values(d, options, 12)
    assert f"restored step 8 from {d}/ckpt-8" in out
    # 3. a third process saves one checkpoint: retention still leaves two. Then the ranks
    #    disagree: one rank's metadata is not JSON, then each passes its own step: every
    #    rank raises the same error, none hangs
    ranks, _ = launch(3, d, env, "--steps", "16", "--checks")
    assert ranks[0]["start"] == 12 and ranks[0]["saved"] == [15] and ckpts(d, options) == [12, 15]
    bad_meta, bad_step = ranks[0]["errors"]
    assert "failed on rank(s) 2" in bad_meta and "not JSON-serialisable" in bad_meta
    assert "CheckpointManager.save" in bad_step and "step" in bad_step and "1001" in bad_step
    assert [x["errors"] for x in ranks] == [ranks[0]["errors"]] * 3
    # 4. the newest is damaged: one rank falls back to 12, says so, and saves 15 again
    flip_byte(storage.resolve(f"{d}/ckpt-15.data-00001-of-00003", options))
    ranks, out = launch(1, d, env, "--steps", "16")
    assert ranks[0]["start"] == 12 and ranks[0]["restored_ok"] is True and ranks[0]["saved"] == [15]
    assert f"LOG WARNING CheckpointManager: checkpoint {d}/ckpt-15 (step 15) does not restore" in out
    assert "DataLossError" in out and "checksum" in out
    assert ckpts(d, options) == [12, 15]
    check_values(d, options, 15)
    assert ss.latest_checkpoint(d, storage_options=options) == f"{d}/ckpt-15"
    meta = ss.read_metadata(f"{d}/ckpt-15", storage_options=options)
    assert meta["launch_size"] == 1 and meta["step"] == 15
