"""``Saver(restore_in_place="direct")``: one pass straight into the variables' own arrays
(restore/direct.py). The same values as the two-pass default, every byte read once, and
on damage an error that says truly which variables it overwrote partly, which it restored
whole and which it left untouched."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

import shardsave as ss
from shardsave.format.index import entry_key
from tests.crafting import Crafted
from tests.faults.common import run_mpi

MIB_OF_FLOATS = (1 << 20) // 4
ROWS, COLS = 256, 1024  # one rank's piece: 1 MiB of float32, restored in place


def value(name: str, shape) -> np.ndarray:
    seed = sum(map(ord, name))
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def flip(prefix: str, shard: int, shards: int, offset: int) -> None:
    """Flip one bit of data file ``shard`` at ``offset``."""
    path = f"{prefix}.data-{shard:05d}-of-{shards:05d}"
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_direct_restore_gives_the_same_values_reading_each_byte_once(tmp_path):
    whole = value("whole", (3 * MIB_OF_FLOATS,))
    wide = value("wide", (2048, 1024))  # 8 MiB: column halves go a slab of rows at a time
    small = np.arange(10, dtype=np.float32)
    prefix = ss.Saver(
        [ss.Variable(n, v, register=False) for n, v in (("whole", whole), ("wide", wide), ("small", small))]
    ).save(str(tmp_path / "m"))

    v_whole = ss.Variable("whole", np.zeros_like(whole), register=False)
    halves = [
        ss.Variable(
            "wide", np.zeros((2048, 512), np.float32), global_shape=wide.shape, offset=(0, c), register=False
        )
        for c in (0, 512)
    ]
    v_small = ss.Variable("small", np.zeros_like(small), register=False)
    owns = [v.value for v in (v_whole, *halves, v_small)]
    saver = ss.Saver({"whole": v_whole, "wide": halves, "small": v_small}, restore_in_place="direct")
    assert saver.restore_in_place == "direct"
    saver.restore(prefix)
    for v, own in zip((v_whole, *halves, v_small), owns, strict=True):
        assert v.value is own
    np.testing.assert_array_equal(v_whole.value, whole)
    np.testing.assert_array_equal(halves[0].value, wide[:, :512])
    np.testing.assert_array_equal(halves[1].value, wide[:, 512:])
    np.testing.assert_array_equal(v_small.value, small)
    stats = saver.last_restore_stats
    assert stats.bytes_reread == 0
    # the column halves read whole stored rows (twice the bytes they need): what the atomic
    # mode reads in its check pass too, and then again in its fill
    assert stats.bytes_read <= whole.nbytes + 2 * wide.nbytes + small.nbytes + (1 << 16)

    atomic = ss.Saver({"whole": v_whole, "wide": halves, "small": v_small})
    atomic.restore(prefix)
    assert atomic.last_restore_stats.bytes_reread == whole.nbytes + 2 * wide.nbytes
    assert atomic.last_restore_stats.bytes_read == stats.bytes_read


@pytest.mark.parametrize("bad", [2, "Direct", "twice", None, 1.0])
def test_restore_in_place_takes_only_its_three_modes(bad):
    with pytest.raises(ss.InvalidArgumentError, match="restore_in_place"):
        ss.Saver([ss.Variable("x", np.zeros(3), register=False)], restore_in_place=bad)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> str:
    """``w0`` and ``w1`` (4 x ROWS rows) saved row-sharded by 4 ranks, and a small
    replicated ``b``: one data file per rank."""
    directory = tmp_path_factory.mktemp("direct")
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from mpi4py import MPI
        import shardsave as ss
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_direct_restore import value, ROWS, COLS
        rank = MPI.COMM_WORLD.Get_rank()
        shape = (4 * ROWS, COLS)
        vs = [
            ss.Variable(n, value(n, shape)[rank * ROWS : (rank + 1) * ROWS], global_shape=shape,
                        offset=(rank * ROWS, 0), register=False)
            for n in ("w0", "w1")
        ]
        vs.append(ss.Variable("b", np.arange(7, dtype=np.float32), register=False))
        ss.Saver(vs).save(sys.argv[1])
        """
    )
    prefix = str(directory / "m")
    done = run_mpi(4, ["-c", script, prefix])
    assert done.returncode == 0, done.stderr
    return prefix


def restored_blocks(rows_of: dict[str, list[tuple[int, int]]]) -> dict[tuple[str, int], ss.Variable]:
    """Variables holding rows ``[start, stop)`` of ``w0``/``w1``, filled with -1."""
    shape = (4 * ROWS, COLS)
    return {
        (name, start): ss.Variable(
            name,
            np.full((stop - start, COLS), -1, np.float32),
            global_shape=shape,
            offset=(start, 0),
            register=False,
        )
        for name, spans in rows_of.items()
        for start, stop in spans
    }


@pytest.mark.parametrize("damaged_shard", [1, 2])
def test_damage_mid_way_names_what_it_overwrote_and_leaves_the_rest(four_ranks, tmp_path, damaged_shard):
    """Restored on one process, in blocks that each lie in one data file but one (rows
    ROWS/2 .. 3 ROWS/2 of w1: files 0 and 1), one bit flipped in w0's piece in file 1 or
    in file 2. Files are read in order: blocks of earlier files are restored whole, blocks
    of later ones untouched, w0's damaged block partly overwritten, and what the error says
    of each is what its array holds."""
    import shutil

    prefix = str(tmp_path / "m")
    for f in os.listdir(os.path.dirname(four_ranks)):
        shutil.copy(os.path.join(os.path.dirname(four_ranks), f), tmp_path)
    crafted = Crafted.load(prefix)
    entry = dict(crafted.entries)[entry_key("w0", [(damaged_shard * ROWS, ROWS), (0, COLS)])]
    assert entry.shard_id == damaged_shard
    flip(prefix, damaged_shard, 4, entry.offset + entry.size // 2)

    blocks = restored_blocks(
        {
            "w0": [(r * ROWS, (r + 1) * ROWS) for r in range(4)],
            "w1": [(ROWS // 2, 3 * ROWS // 2), (3 * ROWS, 4 * ROWS)],
        }
    )
    bias = ss.Variable("b", np.full(7, -1, np.float32), register=False)
    owns = {key: v.value for key, v in blocks.items()}
    var_list = {
        "w0": [v for (n, _), v in blocks.items() if n == "w0"],
        "w1": [v for (n, _), v in blocks.items() if n == "w1"],
        "b": bias,
    }
    with pytest.raises(ss.DataLossError) as info:
        ss.Saver(var_list, restore_in_place="direct").restore(prefix)
    error = info.value
    message = str(error)
    assert "checksum does not match for tensor 'w0'" in message
    assert "partly overwritten" in message and "restore_in_place='direct'" in message
    assert error.partly == ["w0"] or set(error.partly) == {"w0"}

    shape = (4 * ROWS, COLS)
    states = {}
    for (name, start), v in blocks.items():
        assert v.value is owns[(name, start)]
        want = value(name, shape)[start : start + v.value.shape[0]]
        if np.array_equal(v.value, want):
            states[(name, start)] = "restored"
        elif (v.value == -1).all():
            states[(name, start)] = "untouched"
        else:
            states[(name, start)] = "partly"
    # earlier files restored whole, the damaged block partly written, later files untouched
    for (name, start), state in states.items():
        first_file = start // ROWS
        last_file = (start + blocks[(name, start)].value.shape[0] - 1) // ROWS
        if name == "w0" and first_file == damaged_shard:
            assert state == "partly", (name, start)
        elif last_file < damaged_shard:
            assert state == "restored", (name, start)
        elif first_file > damaged_shard:
            assert state == "untouched", (name, start)
    # and the error's lists say exactly that, per tensor name
    for name in ("w0", "w1"):
        of_name = {s for (n, _), s in states.items() if n == name}
        claims = {
            k
            for k, names in (
                ("partly", error.partly),
                ("restored", error.restored),
                ("untouched", error.untouched),
            )
            if name in names
        }
        assert of_name == claims, (name, states, error.partly, error.restored, error.untouched)
    # a small variable is read straight into its own array too, before the large ones
    assert "b" in error.restored
    np.testing.assert_array_equal(bias.value, np.arange(7, dtype=np.float32))


def test_direct_restore_on_three_ranks_of_four_reads_each_byte_once(four_ranks):
    """A 4 -> 3 reshard by rows under mpiexec: bit-exact, bytes read within 1.05x of the
    bytes needed, none read twice."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from mpi4py import MPI
        import shardsave as ss
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_direct_restore import value, ROWS, COLS
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        shape = (4 * ROWS, COLS)
        start, stop = rank * shape[0] // size, (rank + 1) * shape[0] // size
        vs = [
            ss.Variable(n, np.zeros((stop - start, COLS), np.float32), global_shape=shape, offset=(start, 0),
                        register=False)
            for n in ("w0", "w1")
        ]
        owns = [v.value for v in vs]
        saver = ss.Saver(vs, restore_in_place="direct")
        saver.restore(sys.argv[1])
        for v, own in zip(vs, owns):
            assert v.value is own
            assert np.array_equal(v.value, value(v.name, shape)[start:stop]), v.name
        s = saver.last_restore_stats
        assert s.bytes_reread == 0 and s.bytes_read <= 1.05 * s.bytes_needed, s
        print("ratio", s.bytes_read / s.bytes_needed)
        """
    )
    done = run_mpi(3, ["-c", script, four_ranks])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ratio") == 3


def test_direct_restore_of_a_damaged_file_on_one_rank_fails_on_every_rank(four_ranks, tmp_path):
    import shutil

    for f in os.listdir(os.path.dirname(four_ranks)):
        shutil.copy(os.path.join(os.path.dirname(four_ranks), f), tmp_path)
    prefix = str(tmp_path / "m")
    entry = dict(Crafted.load(prefix).entries)[entry_key("w1", [(3 * ROWS, ROWS), (0, COLS)])]
    flip(prefix, entry.shard_id, 4, entry.offset + 5)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from mpi4py import MPI
        import shardsave as ss
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_direct_restore import value, ROWS, COLS
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        shape = (4 * ROWS, COLS)
        v = ss.Variable("w1", np.zeros((2 * ROWS, COLS), np.float32), global_shape=shape,
                        offset=(2 * ROWS * rank, 0), register=False)
        try:
            ss.Saver([v], restore_in_place="direct").restore(sys.argv[1])
            said = "nothing raised"
        except ss.DataLossError as exc:
            said = str(exc)
        said = comm.gather(said)
        if rank == 0:
            print(repr(said))
        """
    )
    done = run_mpi(2, ["-c", script, prefix], timeout=60)
    assert done.returncode == 0, done.stderr
    said = eval(done.stdout)  # each rank's message: rank 1 found the damage
    assert all("failed on rank(s) 1" in s and "checksum does not match for tensor 'w1'" in s for s in said)
    assert said[0].endswith(
        "on rank 0 variables were written before this was found: partly overwritten, "
        "holding neither their old nor their restored values: none; restored whole: 'w1'; untouched: none"
    )
    assert said[1].endswith(
        "on rank 1 variables were written before this was found: partly overwritten, "
        "holding neither their old nor their restored values: 'w1'; restored whole: none; untouched: none"
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def rows_state(arr: np.ndarray, want: np.ndarray) -> str:
    if np.array_equal(arr, want):
        return "restored"
    return "untouched" if (arr == -1).all() else "partly"


def test_large_reads_land_a_chunk_at_a_time_checked_and_exact(tmp_path):
    """Tensors of several CHECK_CHUNKs are read and checked a chunk at a time by each I/O
    thread: whole pieces, and rows of two pieces whose edges cut checksum blocks (the
    partial blocks around them land in small buffers). Bit-exact, each byte read once."""
    from shardsave.restore.verify import CHECK_CHUNK

    shape = (12000, 1000)  # rows of 4000 bytes: row edges fall inside 64 KiB blocks
    t = value("t", shape)
    assert t.nbytes > 40 * CHECK_CHUNK
    halves = [
        ss.Variable("t", t[a:b].copy(), global_shape=shape, offset=(a, 0), register=False)
        for a, b in ((0, 6000), (6000, 12000))
    ]
    prefix = ss.Saver({"t": halves}, max_to_keep=None).save(str(tmp_path / "m"))
    cuts = [(0, 4936), (4936, 11996), (11996, 12000)]
    parts = [
        ss.Variable(
            "t", np.full((b - a, 1000), -1, np.float32), global_shape=shape, offset=(a, 0), register=False
        )
        for a, b in cuts
    ]
    owns = [p.value for p in parts]
    saver = ss.Saver({"t": parts}, restore_in_place="direct")
    saver.restore(prefix)
    for p, own, (a, b) in zip(parts, owns, cuts, strict=True):
        assert p.value is own
        np.testing.assert_array_equal(p.value, t[a:b])
    stats = saver.last_restore_stats
    assert stats.requests >= t.nbytes // CHECK_CHUNK  # chunked: not one read per piece
    assert stats.bytes_read <= stats.bytes_needed + 4 * (1 << 16)  # the blocks cut at the edges
    # a restore into new arrays takes the same chunked reads
    fresh = [
        ss.Variable(
            "t", np.zeros((b - a, 1000), np.float32), global_shape=shape, offset=(a, 0), register=False
        )
        for a, b in cuts
    ]
    ss.Saver({"t": fresh}, restore_in_place=False).restore(prefix)
    for p, (a, b) in zip(fresh, cuts, strict=True):
        np.testing.assert_array_equal(p.value, t[a:b])


@pytest.mark.parametrize("where", ["middle", "edge block"])
def test_damage_in_one_chunk_of_a_large_read_is_named(tmp_path, where):
    """One bit flipped in a chunk of a large piece (in its middle, or in the checksum block
    cut by the restored rows' edge, read into a small buffer): DataLossError naming the
    block; the tensor is reported partly overwritten; another tensor's account is what its
    array holds."""
    from shardsave.restore.verify import CHECK_CHUNK

    shape = (3000, 1000)
    t, u = value("t", shape), value("u", (2 * CHECK_CHUNK // 4,))
    prefix = ss.Saver(
        [ss.Variable("t", t, register=False), ss.Variable("u", u, register=False)], max_to_keep=None
    ).save(str(tmp_path / "m"))
    entry = dict(Crafted.load(prefix).entries)[entry_key("t")]
    first_row = 1234
    at = entry.size // 2 if where == "middle" else first_row * 4000 - 10  # before the rows: head block
    flip(prefix, entry.shard_id, 1, entry.offset + at)
    part = ss.Variable(
        "t",
        np.full((3000 - first_row, 1000), -1, np.float32),
        global_shape=shape,
        offset=(first_row, 0),
        register=False,
    )
    other = ss.Variable("u", np.full_like(u, -1), register=False)
    with pytest.raises(ss.DataLossError) as info:
        ss.Saver([part, other], restore_in_place="direct").restore(prefix)
    error = info.value
    assert "checksum does not match for tensor 't'" in str(error)
    assert f"bytes {entry.offset + at // (1 << 16) * (1 << 16)}.." in str(error)
    assert "t" in error.partly  # and "u" too if a chunk of it was landing meanwhile
    assert rows_state(part.value, t[first_row:]) == "partly"
    claim = next(k for k in ("partly", "restored", "untouched") if "u" in getattr(error, k))
    assert rows_state(other.value, u) == claim


UNSET = 111  # what a variable holds before it is restored (fits every dtype below)


def small_tensors(count: int = 400) -> dict[str, np.ndarray]:
    """Small tensors of several dtypes and sizes (1 byte to 20 KB), packed in one file."""
    rng = np.random.default_rng(7)
    dtypes = (np.float32, np.int8, np.float64, np.int16, np.uint32)
    out = {}
    for i in range(count):
        n = int(rng.integers(1, 5000)) if i % 7 else 1
        out[f"s{i:03d}"] = (np.abs(rng.standard_normal(n)) * 100).astype(dtypes[i % len(dtypes)])
    return out


def test_small_tensors_land_straight_in_their_arrays_a_run_at_a_time(tmp_path):
    """A direct restore reads whole small tensors into the variables' own arrays, neighbours
    in one vectored read: a subset of the tensors (gaps between them, some over MAX_GAP),
    bit-exact, each variable keeping its array. A read-only array, and one array shared
    by two variables, get new arrays instead."""
    from shardsave.restore import small_in_place

    stored = small_tensors()
    prefix = ss.Saver([ss.Variable(n, v, register=False) for n, v in stored.items()]).save(
        str(tmp_path / "m")
    )
    wanted = [n for i, n in enumerate(stored) if i % 3]  # every third left out: gaps
    assert any(stored[n].nbytes > small_in_place.MAX_GAP for i, n in enumerate(stored) if not i % 3)
    mine = {n: ss.Variable(n, np.full_like(stored[n], UNSET), register=False) for n in wanted}
    frozen = np.full_like(stored[wanted[5]], UNSET)
    frozen.flags.writeable = False
    mine[wanted[5]] = ss.Variable(wanted[5], frozen, register=False)
    pair = ("s035", "s070")  # both float32 of shape (1,): one array for both variables
    assert all(n in wanted and stored[n].shape == (1,) and stored[n].dtype == np.float32 for n in pair)
    twice = np.full_like(stored[pair[0]], UNSET)
    for n in pair:
        mine[n] = ss.Variable(n, twice, register=False)
    owns = {k: v.value for k, v in mine.items()}
    saver = ss.Saver(mine, restore_in_place="direct")
    saver.restore(prefix)
    for key, v in mine.items():
        if key not in pair:
            np.testing.assert_array_equal(v.value, stored[v.name], err_msg=key)
        if key != wanted[5]:
            assert v.value is owns[key], key
    assert mine[wanted[5]].value is not frozen
    assert twice[0] in (stored[pair[0]][0], stored[pair[1]][0])
    stats = saver.last_restore_stats
    assert stats.bytes_reread == 0
    assert stats.requests < len(wanted) // 3  # runs of neighbours, not a read per tensor
    needed = sum(stored[n].nbytes for n in wanted)
    assert needed <= stats.bytes_read <= needed + len(wanted) * small_in_place.MAX_GAP


def test_damage_in_one_small_tensor_names_it_and_accounts_for_the_others(tmp_path):
    """One bit flipped in one small tensor: DataLossError naming it, reported partly
    overwritten, and every other variable's account is what its array holds."""
    stored = small_tensors()
    prefix = ss.Saver([ss.Variable(n, v, register=False) for n, v in stored.items()]).save(
        str(tmp_path / "m")
    )
    victim = "s123"
    entry = dict(Crafted.load(prefix).entries)[entry_key(victim)]
    flip(prefix, 0, 1, entry.offset + entry.size // 2)
    mine = {n: ss.Variable(n, np.full_like(v, UNSET), register=False) for n, v in stored.items()}
    with pytest.raises(ss.DataLossError) as info:
        ss.Saver(mine, restore_in_place="direct").restore(prefix)
    error = info.value
    assert f"checksum does not match for tensor {victim!r}" in str(error)
    assert victim in error.partly
    assert sorted(error.partly + error.restored + error.untouched) == sorted(stored)
    for name in error.restored:
        np.testing.assert_array_equal(mine[name].value, stored[name], err_msg=name)
    for name in error.untouched:
        assert (mine[name].value == UNSET).all(), name
    assert error.restored, "the runs before the damaged one were restored whole"


def test_a_tree_of_small_leaves_restores_directly_as_the_types_it_had(tmp_path):
    """Small leaves of every kind through a direct restore: scalars come back as their
    types, a writable array is restored into its own memory, a read-only one as a new
    array, a per-rank value into its value."""
    frozen = np.arange(3.0)
    frozen.flags.writeable = False
    w = np.arange(4.0)
    tree = {
        "step": 5,
        "lr": np.float32(0.1),
        "w": w,
        "ro": frozen,
        "rng": ss.PerRank(np.arange(3)),
        "on": True,
    }
    saver = ss.Saver(tree, restore_in_place="direct")
    prefix = saver.save(str(tmp_path / "m"))
    tree.update(step=9, lr=np.float32(0.5), on=False)
    w[:] = -1
    tree["rng"].value[:] = -7
    out = saver.restore(prefix)
    assert out["step"] == 5 and type(out["step"]) is int
    assert out["lr"] == np.float32(0.1) and type(out["lr"]) is np.float32
    assert out["on"] is True
    assert out["w"] is w and w.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert out["ro"].tolist() == [0.0, 1.0, 2.0]
    assert tree["rng"].value.tolist() == [0, 1, 2]
    assert saver.last_restore_stats.bytes_reread == 0
