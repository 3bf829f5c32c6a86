"""The fast tier (tiers/) under real mpiexec, nodes simulated with SHARDSAVE_NODE_ID and
``{node}`` directories: a lost node's files come back from partner copies or XOR parity,
bit-exact, without reading the durable tier; damaged copies are caught and the durable
tier is used; restarts on other rank counts restore from the fast tier; kills during a
fast save or a drain never leave a checkpoint that restores wrong; scavenge."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

import shardsave as ss
from tests.faults.common import MPIEXEC, run_group, run_nodes
from tests.tiers import job as tier_job

JOB = "tests/tiers/job.py"
pytestmark = pytest.mark.mpi


def run(nodes, tmp_path, *args, expect_ok: bool = True, timeout: float = 120) -> list[dict] | None:
    base = ["--durable", str(tmp_path / "durable"), "--local", str(tmp_path / "local" / "{node}")]
    r = run_nodes(nodes, [JOB, *base, *args], timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if not expect_ok:
        return None
    assert r.returncode == 0 and lines, f"job failed ({r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    out = json.loads(lines[0][len("RESULT ") :])
    out[0]["_stderr"] = r.stderr
    return out


def lose(tmp_path, node: str) -> None:
    shutil.rmtree(tmp_path / "local" / node)


def flip_byte(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def hide_durable_data(tmp_path) -> list:
    """Move the durable tier's data files away (index and state file stay): a restore
    that read the durable tier would fail."""
    durable = tmp_path / "durable"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    moved = sorted(durable.glob("*.data-*"))
    for p in moved:
        p.rename(hidden / p.name)
    return moved


def sources(result: dict) -> dict[int, str]:
    return {f["rank"]: f["source"] for f in result["restored_from"]["files"]}


def durable_restores(tmp_path, cols: int = 1000) -> int | None:
    """The durable tier alone, as an ordinary checkpoint directory, in this process."""
    w = ss.Variable("w", np.zeros((tier_job.ROWS, cols), np.float32), register=False)
    step = ss.Variable("step", np.int64(-1), register=False)
    with ss.CheckpointManager(tmp_path / "durable", [w, step], max_to_keep=None) as mgr:
        got = mgr.restore_or_initialize()
        if got is not None:
            np.testing.assert_array_equal(w.value, tier_job.value(got, cols))
            assert int(step.value) == got
        return got


def restore_hidden(tmp_path) -> None:
    for p in (tmp_path / "hidden").iterdir():
        p.rename(tmp_path / "durable" / p.name)
    (tmp_path / "hidden").rmdir()


def check_sources(out: list[dict], lost: str, expected: str) -> None:
    lost_ranks = [r["rank"] for r in out if r["node"] == lost]
    got = sources(out[0])
    assert {r: s for r, s in got.items() if r in lost_ranks} == dict.fromkeys(lost_ranks, expected), got
    assert all(s == "data" for r, s in got.items() if r not in lost_ranks), got


def test_partner_a_lost_node_comes_back_bit_exact_and_a_damaged_copy_is_never_used(tmp_path):
    nodes = [("a", 2), ("b", 2)]
    common = ["--redundancy", "partner", "--persist", "3"]
    assert run(nodes, tmp_path, *common, "--steps", "5")[0]["saved"] == [0, 1, 2, 3, 4]
    lose(tmp_path, "b")
    hide_durable_data(tmp_path)
    out = run(nodes, tmp_path, *common, "--steps", "6")  # restores 4, saves 5
    assert all(r["start"] == 4 and r["exact"] for r in out), out
    assert out[0]["restored_from"]["tier"] == "fast" and out[0]["restored_from"]["fallbacks"] == []
    check_sources(out, "b", "partner")
    assert "restored step 4 from the fast tier" in out[0]["_stderr"]
    # one byte of rank 0's partner copy of step 5 flipped, then rank 0's node lost
    restore_hidden(tmp_path)
    flip_byte(tmp_path / "local" / "b" / "ckpt-5.partner-00000-of-00004")
    lose(tmp_path, "a")
    out = run(nodes, tmp_path, *common, "--steps", "6")
    # step 5: the damaged copy is caught; step 4 was only on node a (node b lost its copy
    # of step 4 before), and the durable tier has 0 and 3
    assert all(r["start"] == 3 and r["exact"] for r in out), out
    where = out[0]["restored_from"]
    assert where["tier"] == "durable"
    damaged = [f for f in where["fallbacks"] if f.startswith("step 5")]
    assert damaged and "partner copy of rank 0" in damaged[0] and "fails its check" in damaged[0], where
    assert "step 5 does not restore from the fast tier" in out[0]["_stderr"]  # logged, WARNING


def test_xor_rebuilds_a_lost_node_catches_damaged_parity_and_falls_back_when_two_are_lost(tmp_path):
    nodes = [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    common = ["--redundancy", "xor", "--group", "4", "--persist", "3"]
    run(nodes, tmp_path, *common, "--steps", "5")
    lose(tmp_path, "d")
    hide_durable_data(tmp_path)
    out = run(nodes, tmp_path, *common, "--steps", "6")  # restores 4 (rank 3 rebuilt), saves 5
    assert all(r["start"] == 4 and r["exact"] for r in out), out
    assert out[0]["restored_from"]["tier"] == "fast"
    check_sources(out, "d", "rebuilt")
    assert (tmp_path / "local" / "d" / "ckpt-4.data-00003-of-00004").exists()  # written back
    # damaged parity, then a lost member: step 5 is caught, step 4 lacks d's parity: durable 3
    restore_hidden(tmp_path)
    flip_byte(tmp_path / "local" / "c" / "ckpt-5.parity-00002-of-00004")
    lose(tmp_path, "a")
    out = run(nodes, tmp_path, *common, "--steps", "7")  # restores 3, saves 4 5 6 (6 drains)
    assert all(r["start"] == 3 and r["exact"] for r in out), out
    where = out[0]["restored_from"]
    assert where["tier"] == "durable"
    assert any(
        "step 5" in f and "rebuilt data file of rank 0" in f and "fails its check" in f
        for f in where["fallbacks"]
    )
    assert any("step 4" in f and "parity of rank 3" in f for f in where["fallbacks"]), where["fallbacks"]
    # two nodes of the group lost: nothing can be rebuilt; the durable tier's newest
    lose(tmp_path, "c")
    lose(tmp_path, "d")
    out = run(nodes, tmp_path, *common, "--steps", "7")
    assert all(r["start"] == 6 and r["exact"] for r in out), out
    assert out[0]["restored_from"]["tier"] == "durable"
    assert any("is lost too" in f for f in out[0]["restored_from"]["fallbacks"])


COLS = 16384  # 64 KiB rows: entries have per-block CRCs, so a reshard reads little more than it needs


def test_a_restart_on_another_rank_count_restores_from_the_fast_tier(tmp_path):
    common = ["--redundancy", "partner", "--persist", "10", "--cols", str(COLS)]
    run([("a", 2), ("b", 2)], tmp_path, *common, "--steps", "3")
    hide_durable_data(tmp_path)
    shutil.copytree(tmp_path / "local", tmp_path / "local-saved")
    for restart in ([("a", 2), ("b", 1)], [("a", 3), ("b", 3)]):  # 4 -> 3 and 4 -> 6 ranks
        shutil.rmtree(tmp_path / "local")
        shutil.copytree(tmp_path / "local-saved", tmp_path / "local")
        out = run(restart, tmp_path, *common, "--steps", "3")
        assert all(r["start"] == 2 and r["exact"] for r in out), out
        for r in out:
            where = r["restored_from"]
            assert where["tier"] == "fast"
            # only what its blocks need, widened to whole 64 KiB checksum blocks (and the index)
            assert where["bytes_needed"] <= where["bytes_read"] <= where["bytes_needed"] + 4 * 65536 + 4096, (
                where
            )


def test_kills_during_a_fast_save_and_a_drain_never_leave_a_wrong_checkpoint(tmp_path):
    nodes = [("a", 2), ("b", 2)]
    common = ["--redundancy", "partner", "--persist", "3", "--cols", str(COLS), "--timeout", "10"]
    # the last rank dies right after save(4) returned: step 4's fast save and step 3's drain run
    run(nodes, tmp_path, *common, "--steps", "8", "--kill-at", "4", expect_ok=False, timeout=90)
    listed = sorted(p.name for p in (tmp_path / "durable").iterdir())
    assert "ckpt-0.index" in listed
    assert durable_restores(tmp_path, COLS) in (0, 3)  # whichever committed, bit-exact
    out = run(nodes, tmp_path, *common, "--steps", "5")
    assert all(r["start"] in (3, 4) and r["exact"] for r in out), out


def test_scavenge_copies_the_newest_fast_step_once(tmp_path):
    nodes = [("a", 2), ("b", 2)]
    run(nodes, tmp_path, "--redundancy", "partner", "--persist", "3", "--steps", "6")
    assert durable_restores(tmp_path) == 3
    lose(tmp_path, "b")  # scavenge too takes the partner copies

    def scavenge():
        cmd = [MPIEXEC]
        for i, node in enumerate(("a", "b")):
            cmd += [":"] * bool(i) + ["-n", "1", "-env", "SHARDSAVE_NODE_ID", node, sys.executable]
            cmd += [
                "-m",
                "shardsave.cli",
                "scavenge",
                str(tmp_path / "local" / "{node}"),
                str(tmp_path / "durable"),
            ]
        r = run_group(cmd, None, 90)
        assert r.returncode == 0, r.stderr[-4000:]
        return r.stdout

    assert f"copied step 5 to {tmp_path / 'durable'}/ckpt-5" in scavenge()
    assert durable_restores(tmp_path) == 5
    assert "nothing to do" in scavenge()


def test_construction_needs_the_nodes_the_scheme_needs(tmp_path):
    w = ss.Variable("w", np.zeros(4, np.float32), register=False)
    with pytest.raises(ss.errors.FailedPreconditionError, match="at least 2 nodes"):
        ss.CheckpointManager(tmp_path / "d", [w], local_directory=str(tmp_path / "l"), redundancy="partner")
    with pytest.raises(ss.errors.InvalidArgumentError, match="local_directory"):
        ss.CheckpointManager(tmp_path / "d", [w], redundancy="xor")
    with pytest.raises(ss.errors.InvalidArgumentError, match="redundancy must be one of"):
        ss.CheckpointManager(tmp_path / "d", [w], local_directory=str(tmp_path / "l"), redundancy="raid")


def test_one_process_fast_tier_round_trip(tmp_path):
    """A single process: the fast tier, a drain on close(persist=True), a restart from it."""
    w = ss.Variable("w", np.arange(10, dtype=np.float32), register=False)
    kw = {"local_directory": str(tmp_path / "local" / "{node}"), "max_to_keep": 2}
    os.environ.pop("SHARDSAVE_NODE_ID", None)
    with ss.CheckpointManager(tmp_path / "durable", [w], **kw) as mgr:
        for step in range(3):
            w.assign(np.full(10, step, np.float32))
            mgr.save(step)
        assert mgr.all_steps() == [1, 2]
        mgr.close(persist=True)
    assert sorted(p.name for p in (tmp_path / "durable").glob("*.index")) == ["ckpt-2.index"]
    tf = pytest.importorskip("tensorflow")  # the drained copy is an ordinary TF checkpoint
    assert tf.train.latest_checkpoint(str(tmp_path / "durable")).endswith("ckpt-2")
    np.testing.assert_array_equal(
        tf.train.load_checkpoint(str(tmp_path / "durable" / "ckpt-2")).get_tensor("w"),
        np.full(10, 2, np.float32),
    )
    w.assign(np.zeros(10, np.float32))
    with ss.CheckpointManager(tmp_path / "durable", [w], **kw) as mgr:
        assert mgr.restore_or_initialize() == 2
        assert mgr.restored_from["tier"] == "fast"
    np.testing.assert_array_equal(w.value, np.full(10, 2, np.float32))


def test_a_state_the_fast_tier_does_not_hold_is_an_error_not_a_fresh_start(tmp_path):
    """A variable the checkpoint lacks is the caller's mistake: raised, never 'no
    checkpoint restores, starting fresh' (which would let retention delete them all)."""
    kw = {"local_directory": str(tmp_path / "local" / "{node}")}
    w = ss.Variable("w", np.ones(3, np.float32), register=False)
    with ss.CheckpointManager(tmp_path / "durable", [w], **kw) as mgr:
        mgr.save(1)
    other = ss.Variable("renamed", np.zeros(3, np.float32), register=False)
    with (
        ss.CheckpointManager(tmp_path / "durable", [other], **kw) as mgr,
        pytest.raises(ss.errors.NotFoundError, match="renamed"),
    ):
        mgr.restore_or_initialize()


def test_one_directory_for_two_nodes_or_for_both_tiers_is_refused(tmp_path):
    """Without {node}, simulated nodes share one directory (as nodes on a shared
    filesystem would): a lost node would lose every copy, so construction says so."""
    shared = str(tmp_path / "local")
    r = run_nodes(
        [("a", 1), ("b", 1)], [JOB, "--durable", str(tmp_path / "d"), "--local", shared, "--steps", "1"]
    )
    assert r.returncode != 0
    assert "is the same directory" in r.stderr and "on nodes a, b" in r.stderr, r.stderr[-3000:]
    w = ss.Variable("w", np.zeros(4, np.float32), register=False)
    with pytest.raises(ss.errors.InvalidArgumentError, match="is the durable directory too"):
        ss.CheckpointManager(tmp_path / "both", [w], local_directory=str(tmp_path / "both"))


def test_saving_a_step_again_replaces_it_only_once_the_new_save_commits(tmp_path, monkeypatch):
    """A re-save (a resumed loop saving a step the fast tier has) is staged and swapped in
    at its commit: a failure before that leaves the earlier save of the step whole."""
    from shardsave.tiers import fast_save

    kw = {"local_directory": str(tmp_path / "local" / "{node}"), "local_max_to_keep": 3}
    w = ss.Variable("w", np.zeros(8, np.float32), register=False)
    with ss.CheckpointManager(tmp_path / "durable", [w], **kw) as mgr:
        for step in (0, 1):
            w.assign(np.full(8, step, np.float32))
            mgr.save(step, blocking=True)
        w.assign(np.full(8, 7, np.float32))
        mgr.save(1, blocking=True)  # replaced: 7s

        def peer_lost(*args, **kwargs):  # a peer dying mid-redundancy, as one process can
            raise ss.errors.UnavailableError("a peer went away")

        monkeypatch.setattr(fast_save.redundancy, "protect", peer_lost)
        w.assign(np.full(8, 99, np.float32))
        with pytest.raises(ss.errors.UnavailableError, match="went away"):
            mgr.save(1, blocking=True)
        monkeypatch.undo()
    names = sorted(os.listdir(next((tmp_path / "local").iterdir())))
    assert "ckpt-1.index" in names and any(n.endswith(".staged") for n in names)
    with ss.CheckpointManager(tmp_path / "durable", [w], **kw) as mgr:
        assert mgr.restore_or_initialize() == 1
        np.testing.assert_array_equal(w.value, np.full(8, 7, np.float32))
        mgr.save(2, blocking=True)  # a committed save clears the failed one's staged files
    assert not any(n.endswith(".staged") for n in os.listdir(next((tmp_path / "local").iterdir())))


def test_scavenge_of_a_directory_no_node_has_is_an_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    r = run_group(
        [sys.executable, "-m", "shardsave.cli", "scavenge", str(missing / "{node}"), str(tmp_path / "d")],
        dict(os.environ, SHARDSAVE_NODE_ID="a"),
        60,
    )
    assert r.returncode == 1 and "is no directory on any node" in r.stderr, r.stderr
    assert not missing.exists()
