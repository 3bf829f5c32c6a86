"""Save and restore across ranks; run by tests/test_mpi.py under mpiexec with 1-4 ranks.

Phase "save" (once per N) writes ``<root>/n<N>/model-1`` in every layout; phase
"restore" (once per M) restores every ``n<N>`` checkpoint into every layout on M ranks.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
from layouts import LAYOUTS, SAVED, block, global_value
from mpi4py import MPI

import shardsave as ss
from shardsave import storage
from shardsave.save.writer import CHECKSUM_BLOCK

PART_SHAPE = (11, 4)
STRINGS = np.array([b"alpha", b"", b"\x00\xff binary"], dtype=object)


def only(phase_name, phase):
    if phase != phase_name:
        pytest.skip(f"runs in the {phase_name} phase")


def make_vars(layout_of, comm, register=False):
    """This rank's variables: {name: Variable}; layout_of(name) picks the layout."""
    out = {}
    for name, (shape, dtype, saved_layout) in SAVED.items():
        b = block(layout_of(name, saved_layout), shape, comm.rank, comm.size)
        if b is None:
            continue
        (r0, c0), (nr, nc) = b
        value = global_value(name, shape, dtype)[r0 : r0 + nr, c0 : c0 + nc]
        out[name] = ss.Variable(name, value, global_shape=shape, offset=(r0, c0), register=register)
    return out


def save_all(comm, path, step=1):
    ss.reset_default_graph()
    make_vars(lambda name, saved: saved, comm, register=True)
    ss.get_variable(
        "part",
        PART_SHAPE,
        initializer=ss.constant_initializer(global_value("part", PART_SHAPE, np.float32)),
        partitioner=ss.fixed_size_partitioner(5),
        comm=comm,
    )
    ss.Variable("scalar", np.float64(3.5))
    ss.Variable("strings", STRINGS)
    saver = ss.Saver(comm=comm)
    return saver, saver.save(path, global_step=step)


def test_save_every_layout(comm, root, phase):
    only("save", phase)
    d = os.path.join(root, f"n{comm.size}")
    _, prefix = save_all(comm, os.path.join(d, "model"))
    assert prefix == os.path.join(d, "model-1")
    assert comm.allgather(prefix) == [prefix] * comm.size
    comm.Barrier()
    files = sorted(glob.glob(prefix + ".data-*"))
    assert [os.path.basename(f) for f in files] == [
        f"model-1.data-{r:05d}-of-{comm.size:05d}" for r in range(comm.size)
    ]
    assert os.path.exists(prefix + ".index")
    assert ss.latest_checkpoint(d) == prefix


def test_replicated_variables_are_stored_once(comm, root, phase):
    only("save", phase)
    prefix = os.path.join(root, f"n{comm.size}", "model-1")
    reader = ss.CheckpointReader(prefix)
    index = reader.get_entries()
    for name in ("repl", "scalar", "strings"):
        assert name not in index.pieces, f"{name} should be one plain entry"
    numeric = sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t, _ in SAVED.values())
    numeric += int(np.prod(PART_SHAPE)) * 4 + 8
    strings = index.entries["strings"].size
    on_disk = sum(os.path.getsize(f) for f in glob.glob(prefix + ".data-*"))
    assert on_disk == numeric + strings, "some block was written more than once"
    sizes = [os.path.getsize(f) for f in sorted(glob.glob(prefix + ".data-*"))]
    assert len(sizes) == comm.size


def test_saver_uses_its_own_communicator(comm, phase):
    only("save", phase)
    saver = ss.Saver([ss.Variable("x", np.zeros(2), register=False)], comm=comm)
    if comm.size > 1:
        assert MPI.Comm.Compare(saver.comm._comm, comm) == MPI.CONGRUENT
    else:
        assert saver.comm.size == 1


class _DiskFull(OSError):
    pass


def test_rank_failure_mid_save_keeps_previous_checkpoint(comm, root, phase, monkeypatch):
    only("save", phase)
    d = os.path.join(root, f"fail{comm.size}")
    rows = block("rows", (64, 8), comm.rank, comm.size)
    (r0, _), (nr, _) = rows
    good = global_value("f", (64, 8), np.float32)
    v = ss.Variable("f", good[r0 : r0 + nr], global_shape=(64, 8), offset=(r0, 0), register=False)
    saver = ss.Saver([v], comm=comm)
    first = saver.save(os.path.join(d, "model"), global_step=1)
    v.assign(v.value * 0 - 1)
    bad_rank = comm.size - 1
    if comm.rank == bad_rank:

        def full_disk(self, buffer):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(storage.Writer, "write", full_disk)
    # one rank: its own error; several: every rank raises AbortedError
    expected = ss.AbortedError if comm.size > 1 else OSError  # the patched write's own
    with pytest.raises(expected, match="No space left on device") as info:
        saver.save(os.path.join(d, "model"), global_step=2)
    message = str(info.value)
    assert "No space left on device" in message
    if comm.size > 1:
        assert isinstance(info.value, ss.AbortedError)
        assert f"rank(s) {bad_rank}" in message and "model-2" in message
    assert comm.allgather(type(info.value).__name__) == [type(info.value).__name__] * comm.size
    comm.Barrier()
    assert not os.path.exists(os.path.join(d, "model-2.index"))
    assert ss.latest_checkpoint(d) == first
    monkeypatch.undo()
    saver.restore(first)
    assert np.array_equal(v.value, good[r0 : r0 + nr])


def disagreeing_variable(comm):
    """Rank 0 says "w" is [size, 4]; every other rank says [size, 5]."""
    cols = 4 if comm.rank == 0 else 5
    return ss.Variable(
        "w",
        np.ones((1, cols), np.float32),
        global_shape=(comm.size, cols),
        offset=(comm.rank, 0),
        register=False,
    )


def test_ranks_disagreeing_on_shape_commit_nothing(comm, root, phase):
    only("save", phase)
    if comm.size < 2:
        pytest.skip("needs two ranks")
    d = os.path.join(root, f"disagree{comm.size}")
    v = disagreeing_variable(comm)
    with pytest.raises(ss.InvalidArgumentError) as info:
        ss.Saver([v], comm=comm).save(os.path.join(d, "model"))
    message = str(info.value)
    others = ", ".join(str(r) for r in range(1, comm.size))
    assert "'w'" in message
    assert f"ranks 0 have dtype float32 and global shape [{comm.size}, 4]" in message
    assert f"ranks {others} have dtype float32 and global shape [{comm.size}, 5]" in message
    comm.Barrier()
    assert glob.glob(os.path.join(d, "*")) == []


@pytest.mark.parametrize("problem", ["overlap", "gap"])
def test_overlapping_or_missing_blocks_are_caught(comm, root, phase, problem):
    only("save", phase)
    if comm.size < 2:
        pytest.skip("needs two ranks")
    d = os.path.join(root, f"{problem}{comm.size}")
    start = comm.rank * 2 - (1 if problem == "overlap" and comm.rank == 1 else 0)
    rows = 2 if not (problem == "gap" and comm.rank == 1) else 1
    v = ss.Variable(
        "t", np.zeros((rows, 3)), global_shape=(2 * comm.size, 3), offset=(start, 0), register=False
    )
    with pytest.raises(ss.InvalidArgumentError) as info:
        ss.Saver([v], comm=comm).save(os.path.join(d, "model"))
    message = str(info.value)
    assert "'t'" in message
    assert ("overlap" in message) if problem == "overlap" else ("gap" in message)
    if problem == "overlap":
        assert "on rank(s) 0 and" in message and "on rank(s) 1" in message
    else:
        assert "blocks held by rank(s) 0, 1" in message
    comm.Barrier()
    assert glob.glob(os.path.join(d, "*")) == []


# --------------------------------------------------------------------------- restore


def saved_dirs(root):
    return sorted(
        d for d in glob.glob(os.path.join(root, "n*")) if os.path.exists(os.path.join(d, "model-1.index"))
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_restore_any_saved_layout_into(layout, comm, root, phase):
    only("restore", phase)
    dirs = saved_dirs(root)
    assert len(dirs) == 4, f"expected checkpoints saved by 1..4 ranks, found {dirs}"
    for d in dirs:
        targets = make_vars(lambda name, saved: layout, comm)
        for var in targets.values():
            var._set(np.zeros_like(var.value))
        saver = ss.Saver(dict(targets), comm=comm)
        saver.restore(os.path.join(d, "model-1"))
        for name, var in targets.items():
            shape, dtype, _ = SAVED[name]
            want = global_value(name, shape, dtype)[var.block_slices]
            assert np.array_equal(var.value.view(np.uint8), want.view(np.uint8)), (d, name, layout)


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_restore_partitioned_and_replicated(shards, comm, root, phase):
    only("restore", phase)
    want = global_value("part", PART_SHAPE, np.float32)
    for d in saved_dirs(root):
        ss.reset_default_graph()
        part = ss.get_variable("part", PART_SHAPE, partitioner=ss.fixed_size_partitioner(shards), comm=comm)
        scalar = ss.get_variable("scalar", [], dtype=np.float64)
        strings = ss.Variable("strings", dtype=object, shape=[3])
        ss.Saver(comm=comm).restore(os.path.join(d, "model-1"))
        for p in part.parts:
            assert np.array_equal(p.value, want[p.block_slices])
        assert scalar.value == 3.5
        assert list(strings.value) == list(STRINGS)


def test_restore_reads_only_the_bytes_it_needs(comm, root, phase):
    only("restore", phase)
    shape, dtype, _ = SAVED["big"]
    for d in saved_dirs(root):
        n_saved = int(os.path.basename(d)[1:])
        (r0, _), (nr, nc) = block("rows", shape, comm.rank, comm.size)
        var = ss.Variable(
            "big", np.zeros((nr, nc), dtype), global_shape=shape, offset=(r0, 0), register=False
        )
        saver = ss.Saver([var], comm=comm)
        saver.restore(os.path.join(d, "model-1"))
        stats = saver.last_restore_stats
        needed = var.value.nbytes
        saved_pieces = [block("rows", shape, r, n_saved) for r in range(n_saved)]
        overlapping = sum(1 for (s0, _), (sn, _) in saved_pieces if s0 < r0 + nr and r0 < s0 + sn)
        # every stored piece read is widened by at most one checksum block at each end
        assert needed <= stats.bytes_read <= needed + 2 * CHECKSUM_BLOCK * overlapping, (d, stats)
        assert len(stats.files) == overlapping
        assert np.array_equal(var.value, global_value("big", shape, dtype)[r0 : r0 + nr])


def test_restore_tf_partitioned_variable(comm, phase):
    only("restore", phase)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix = os.path.join(here, "data", "tf", "partitioned", "model.ckpt")
    expected = np.load(os.path.join(here, "data", "tf", "expected.npz"))
    emb_want = expected["partitioned/emb"]
    wide_want = expected["partitioned/wide"]
    emb_b = block("rows", emb_want.shape, comm.rank, comm.size)
    wide_b = block("cols", wide_want.shape, comm.rank, comm.size)
    targets = {}
    if emb_b:
        (r0, c0), bs = emb_b
        targets["emb"] = ss.Variable(
            "emb",
            dtype=emb_want.dtype,
            shape=bs,
            global_shape=emb_want.shape,
            offset=(r0, c0),
            register=False,
        )
    if wide_b:
        (r0, c0), bs = wide_b
        targets["wide"] = ss.Variable(
            "wide",
            dtype=wide_want.dtype,
            shape=bs,
            global_shape=wide_want.shape,
            offset=(r0, c0),
            register=False,
        )
    ss.Saver(targets, comm=comm, allow_empty=True).restore(prefix)
    for name, want in (("emb", emb_want), ("wide", wide_want)):
        if name in targets:
            assert np.array_equal(targets[name].value, want[targets[name].block_slices])


def test_failed_restore_changes_no_variable_on_any_rank(comm, root, phase):
    only("restore", phase)
    d = saved_dirs(root)[-1]
    before = np.full(5, 42.0, np.float32)
    repl = ss.Variable("repl", dtype=np.float32, shape=(5, 3), register=False)
    repl._set(np.full((5, 3), 7.0, np.float32))
    name = "scalar" if comm.rank != comm.size - 1 else "no_such_variable"
    other = ss.Variable(name, before if name != "scalar" else np.float64(1.0), register=False)
    with pytest.raises(ss.NotFoundError) as info:
        ss.Saver([repl, other], comm=comm).restore(os.path.join(d, "model-1"))
    assert "no_such_variable" in str(info.value)
    assert np.all(repl.value == 7.0), "a failed restore changed a variable"


def test_damage_on_one_rank_writes_no_variable_in_place_on_any_rank(comm, root, phase):
    """The restore writes into the variables' own arrays only after every rank has checked
    every byte: damage that one rank finds leaves every rank's arrays as they were."""
    only("restore", phase)
    shape, dtype, _ = SAVED["big"]
    target = os.path.join(root, f"damaged-{comm.size}")
    if comm.rank == 0:
        shutil.copytree(saved_dirs(root)[-1], target)
        prefix = os.path.join(target, "model-1")
        pieces = ss.CheckpointReader(prefix).get_entries().pieces["big"]
        last = pieces[max(pieces, key=lambda extents: extents[0][0])]
        path = f"{prefix}.data-{last.shard_id:05d}-of-{len(glob.glob(prefix + '.data-*')):05d}"
        with open(path, "r+b") as f:
            f.seek(last.offset + last.size - 1)
            byte = f.read(1)[0]
            f.seek(last.offset + last.size - 1)
            f.write(bytes([byte ^ 0x01]))
    comm.Barrier()
    (r0, _), (nr, nc) = block("rows", shape, comm.rank, comm.size)
    var = ss.Variable("big", np.full((nr, nc), 7, dtype), global_shape=shape, offset=(r0, 0), register=False)
    own = var.value
    assert own.nbytes >= 1 << 20  # large enough to be restored in place
    with pytest.raises(ss.DataLossError, match="checksum does not match for tensor 'big'"):
        ss.Saver([var], comm=comm).restore(os.path.join(target, "model-1"))
    assert var.value is own and (own == 7).all(), "a failed restore wrote into a variable"


def test_non_blocking_save_while_the_application_communicates(comm, root, phase):
    only("save", phase)
    d = os.path.join(root, f"async{comm.size}")
    shape = (4096, 64)
    (r0, _), (nr, nc) = block("rows", shape, comm.rank, comm.size)
    want = global_value("a", shape, np.float32)
    v = ss.Variable("a", want[r0 : r0 + nr].copy(), global_shape=shape, offset=(r0, 0), register=False)
    saver = ss.Saver([v], comm=comm)
    handle = saver.save(os.path.join(d, "model"), global_step=5, blocking=False)
    v.value[:] = -7  # the staged copy is what gets saved
    for _ in range(20):  # the application's own traffic on COMM_WORLD meanwhile
        total = comm.allreduce(comm.rank)
        assert total == comm.size * (comm.size - 1) // 2
    assert handle.result(timeout=120) == os.path.join(d, "model-5")
    saver.restore(os.path.join(d, "model-5"))
    assert np.array_equal(v.value, want[r0 : r0 + nr])


def test_non_blocking_save_reports_plan_errors_through_the_handle(comm, root, phase):
    only("save", phase)
    if comm.size < 2:
        pytest.skip("needs two ranks")
    d = os.path.join(root, f"async-disagree{comm.size}")
    v = disagreeing_variable(comm)
    saver = ss.Saver([v], comm=comm)
    handle = saver.save(os.path.join(d, "model"), blocking=False)
    with pytest.raises(ss.InvalidArgumentError, match="ranks disagree on variable 'w'"):
        handle.result(timeout=120)
    comm.Barrier()
    assert glob.glob(os.path.join(d, "*")) == []
    saver.wait_until_finished()  # seen through the handle: not raised again
