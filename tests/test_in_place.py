"""Restores into the variables' own arrays (in_place.py): the same values as a restore into
new arrays, the same arrays afterwards, and on damage no array touched at all."""

from __future__ import annotations

import errno
import os
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardsave as ss
import shardsave.restore.targets as targets_module
from shardsave.format import table
from shardsave.format.entry import BundleEntry
from shardsave.restore import in_place as in_place_module
from shardsave.restore import slabs
from shardsave.save.writer import checksum_blocks
from shardsave.storage import threads as io_threads

DATA_FILE = ".data-00000-of-00001"
MIB_OF_FLOATS = (1 << 20) // 4


def blocks(
    name: str, full: np.ndarray, rows: list[int], cols: list[int], fill: float | None = None, copy=False
):
    """The blocks of ``full`` cut at ``rows`` x ``cols``, as variables holding their values
    (or ``fill``; ``copy=True``: variables with arrays of their own, which a restore into
    new arrays replaces)."""
    out = []
    for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
        for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
            value = full[r0:r1, c0:c1] if fill is None else np.full((r1 - r0, c1 - c0), fill, full.dtype)
            out.append(
                ss.Variable(name, value, global_shape=full.shape, offset=(r0, c0), register=False, copy=copy)
            )
    return out


def test_restore_writes_into_the_arrays_the_variables_hold(tmp_path):
    big = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)
    small = np.arange(10, dtype=np.float32)
    prefix = ss.Saver(
        {"big": ss.Variable("big", big, register=False), "small": ss.Variable("small", small, register=False)}
    ).save(str(tmp_path / "m"))
    v_big = ss.Variable("big", np.zeros_like(big), register=False)
    v_small = ss.Variable("small", np.zeros_like(small), register=False)
    own_big, own_small = v_big.value, v_small.value
    saver = ss.Saver([v_big, v_small])
    saver.restore(prefix)
    assert v_big.value is own_big  # written in place
    np.testing.assert_array_equal(own_big, big)
    # under 1 MiB: read into a new array, then copied into the caller's array it shares
    assert v_small.value is own_small
    np.testing.assert_array_equal(own_small, small)
    stats = saver.last_restore_stats
    assert stats.bytes_reread == big.nbytes  # checked once, then read into place


def test_restore_in_place_false_gives_new_arrays(tmp_path):
    big = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver([ss.Variable("big", big, register=False)]).save(str(tmp_path / "m"))
    v = ss.Variable("big", np.zeros_like(big), register=False, copy=True)  # an array of its own
    shared = np.zeros_like(big)
    v_shared = ss.Variable("big", shared, register=False)
    own = v.value
    saver = ss.Saver([v], restore_in_place=False)
    saver.restore(prefix)
    assert v.value is not own and (own == 0).all()
    np.testing.assert_array_equal(v.value, big)
    assert saver.last_restore_stats.bytes_reread == 0
    ss.Saver([v_shared], restore_in_place=False).restore(prefix)
    assert v_shared.value is shared  # read into a new array, then copied into the caller's
    np.testing.assert_array_equal(shared, big)


@pytest.mark.parametrize("unsuitable", ["readonly", "strided", "other dtype"])
def test_arrays_a_restore_cannot_write_into_are_replaced(tmp_path, unsuitable):
    big = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32).reshape(1024, -1)
    prefix = ss.Saver([ss.Variable("big", big, register=False)]).save(str(tmp_path / "m"))
    v = ss.Variable("big", np.zeros_like(big), register=False)
    if unsuitable == "readonly":
        own = np.zeros_like(big)
        own.flags.writeable = False
    elif unsuitable == "strided":
        own = np.zeros((big.shape[1], big.shape[0]), np.float32).T
    else:
        own = np.zeros(big.shape, np.float64)
    v._set(own)
    if unsuitable == "other dtype":
        v.dtype = own.dtype
        with pytest.raises(ss.InvalidArgumentError, match="'big' has dtype float64"):
            ss.Saver([v]).restore(prefix)
        return
    ss.Saver([v]).restore(prefix)
    assert v.value is not own and (own == 0).all()
    np.testing.assert_array_equal(v.value, big)


@pytest.mark.parametrize("cut", ["rows", "cols", "grid"])
def test_resharded_restore_in_place(tmp_path, cut):
    """Rows are read straight into place; columns and grids through slabs of rows and
    copies (every block here is over 1 MiB)."""
    full = np.arange(1536 * 1024, dtype=np.float32).reshape(1536, 1024)
    prefix = ss.Saver({"w": blocks("w", full, [0, 700, 1536], [0, 1024])}).save(str(tmp_path / "m"))
    rows, cols = {
        "rows": ([0, 500, 1536], [0, 1024]),
        "cols": ([0, 1536], [0, 256, 1024]),
        "grid": ([0, 768, 1536], [0, 384, 1024]),
    }[cut]
    targets = blocks("w", full, rows, cols, fill=-1.0)
    owns = [t.value for t in targets]
    ss.Saver({"w": targets}).restore(prefix)
    for t, own in zip(targets, owns, strict=True):
        assert t.value is own
        np.testing.assert_array_equal(own, full[t.block_slices])


@pytest.mark.parametrize("in_place", [True, False])
def test_reshard_by_columns_needs_no_buffer_as_large_as_the_stored_bytes(tmp_path, in_place):
    """A region that is not contiguous in the file is read a slab of rows at a time (in
    place, after a check in 1 MiB pieces; into new arrays, each slab checked on its own):
    the restore allocates a few MiB beyond the arrays it fills, not the 128 MiB stored."""
    full = np.random.default_rng(0).standard_normal((4096, 8192), dtype=np.float32)  # 128 MiB
    prefix = ss.Saver([ss.Variable("w", full, register=False)]).save(str(tmp_path / "m"))
    halves = blocks("w", full, [0, 4096], [0, 3000, 8192], fill=0.0, copy=not in_place)
    owns = [t.value for t in halves]
    saver = ss.Saver({"w": halves}, restore_in_place=in_place)
    tracemalloc.start()
    try:
        saver.restore(prefix)
        peak = tracemalloc.get_traced_memory()[1] - (0 if in_place else full.nbytes)  # new arrays
    finally:
        tracemalloc.stop()
    for t, own in zip(halves, owns, strict=True):
        assert (t.value is own) == in_place
        np.testing.assert_array_equal(t.value, full[t.block_slices])
    bound = io_threads.workers() * (in_place_module.CHECK_CHUNK + slabs.SLAB_BYTES) + (4 << 20)
    assert bound <= full.nbytes // 3
    assert peak < bound, f"peak {peak >> 20} MiB"
    # every stored row holds part of each half: each reads them all, once (plus, into new
    # arrays, the checksum blocks around each slab)
    assert 2 * full.nbytes <= saver.last_restore_stats.bytes_read < 2 * full.nbytes * 1.05


def test_slabs_into_new_arrays_are_each_checked(tmp_path, monkeypatch):
    """A flipped byte anywhere in a column reshard into new arrays: a DataLossError naming
    its checksum block, and no variable changes."""
    monkeypatch.setattr(slabs, "SLAB_BYTES", 300_000)  # slabs of 9 rows of 32 KiB
    full = np.arange(96 * 8192, dtype=np.float32).reshape(96, 8192)
    prefix = ss.Saver([ss.Variable("w", full, register=False)]).save(str(tmp_path / "m"))
    entry = ss.CheckpointReader(prefix).get_entries().entries["w"]
    data_file = Path(prefix + DATA_FILE)
    original = data_file.read_bytes()
    for where in (0, 40 * 32768 + 5, full.nbytes - 1):
        damage(data_file, entry.offset + where)
        targets = blocks("w", full, [0, 96], [0, 5000, 8192], fill=3.0)
        owns = [t.value for t in targets]
        block = entry.offset + where // 65536 * 65536
        with pytest.raises(ss.DataLossError, match=rf"tensor 'w' \(bytes {block}\.\.\)"):
            ss.Saver({"w": targets}, restore_in_place=False).restore(prefix)
        assert all(t.value is own and (own == 3.0).all() for t, own in zip(targets, owns, strict=True))
        data_file.write_bytes(original)
    targets = blocks("w", full, [0, 96], [0, 5000, 8192], fill=3.0)
    saver = ss.Saver({"w": targets}, restore_in_place=False)
    saver.restore(prefix)
    for t in targets:
        np.testing.assert_array_equal(t.value, full[t.block_slices])
    assert saver.last_restore_stats.requests >= 2 * 11  # 11 slabs of rows per target


def test_reshard_of_a_3d_tensor_across_its_inner_dimensions(tmp_path, monkeypatch):
    """Slabs of several rows, each cut on the two inner dimensions."""
    monkeypatch.setattr(slabs, "SLAB_BYTES", 3 * 64 * 96 * 4)
    full = np.arange(40 * 64 * 96, dtype=np.float32).reshape(40, 64, 96)
    pieces = [
        ss.Variable("t", full[a:b], global_shape=full.shape, offset=(a, 0, 0), register=False)
        for a, b in ((0, 17), (17, 40))
    ]
    prefix = ss.Saver({"t": pieces}).save(str(tmp_path / "m"))
    cuts = [((0, 0, 0), (40, 30, 50)), ((0, 0, 50), (40, 30, 46)), ((0, 30, 0), (40, 34, 96))]
    targets = [
        ss.Variable("t", np.zeros(shape, np.float32), global_shape=full.shape, offset=offset, register=False)
        for offset, shape in cuts
    ]
    owns = [t.value for t in targets]
    monkeypatch.setattr(targets_module, "IN_PLACE_MIN_BYTES", 0)
    ss.Saver({"t": targets}).restore(prefix)
    for t, own in zip(targets, owns, strict=True):
        assert t.value is own
        np.testing.assert_array_equal(own, full[t.block_slices])


def damage(path: Path, offset: int) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[offset] ^= 0x10
    path.write_bytes(bytes(damaged))
    return original


@pytest.mark.parametrize("which", ["first", "last"])
def test_damage_anywhere_leaves_every_own_array_untouched(tmp_path, which):
    """Damage in the last bytes of the last tensor is found before the first tensor's
    array is written."""
    a = np.arange(3 * MIB_OF_FLOATS, dtype=np.float32)
    b = -np.arange(3 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver([ss.Variable("a", a, register=False), ss.Variable("b", b, register=False)]).save(
        str(tmp_path / "m")
    )
    entry = ss.CheckpointReader(prefix).get_entries().entries["a" if which == "first" else "b"]
    data_file = Path(prefix + DATA_FILE)
    damage(data_file, entry.offset + (10 if which == "first" else entry.size - 1))
    va = ss.Variable("a", np.full_like(a, 7), register=False)
    vb = ss.Variable("b", np.full_like(b, 7), register=False)
    owns = va.value, vb.value
    with pytest.raises(ss.DataLossError) as info:
        ss.Saver([va, vb]).restore(prefix)
    msg = str(info.value)
    assert (
        str(data_file) in msg
        and "checksum does not match" in msg
        and f"'{'a' if which == 'first' else 'b'}'" in msg
    )
    assert va.value is owns[0] and vb.value is owns[1]
    assert (owns[0] == 7).all() and (owns[1] == 7).all()


def test_truncated_data_file_leaves_own_arrays_untouched(tmp_path):
    a = np.arange(3 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver([ss.Variable("a", a, register=False)]).save(str(tmp_path / "m"))
    data_file = Path(prefix + DATA_FILE)
    data_file.write_bytes(data_file.read_bytes()[: a.nbytes - 100])
    v = ss.Variable("a", np.full_like(a, 7), register=False)
    with pytest.raises(ss.DataLossError, match="file too short.*'a'"):
        ss.Saver([v]).restore(prefix)
    assert (v.value == 7).all()


def test_the_second_pass_reads_the_files_the_first_one_checked(tmp_path, monkeypatch):
    """A checkpoint rewritten at the same prefix between the two passes (another job,
    say) does not mix into the restore: the files stay open from the check to the fill."""
    a = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = str(tmp_path / "m")
    writer = ss.Saver([ss.Variable("a", a, register=False)])
    writer.save(prefix)
    check = in_place_module.InPlaceLoad.check

    def check_then_overwrite(self, targets, stats):
        check(self, targets, stats)
        ss.Saver([ss.Variable("a", a * 0 + 5, register=False)]).save(prefix)

    monkeypatch.setattr(in_place_module.InPlaceLoad, "check", check_then_overwrite)
    v = ss.Variable("a", np.zeros_like(a), register=False)
    ss.Saver([v]).restore(prefix)
    np.testing.assert_array_equal(v.value, a)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    saved=st.tuples(st.lists(st.integers(1, 47), max_size=3), st.lists(st.integers(1, 23), max_size=2)),
    restored=st.tuples(st.lists(st.integers(1, 47), max_size=3), st.lists(st.integers(1, 23), max_size=2)),
    damaged_at=st.none() | st.floats(0, 1, exclude_max=True),
    slab_bytes=st.sampled_from([1, 200, 4 << 20]),
    data=st.data(),
)
def test_any_layout_restored_in_place_is_exact_or_untouched(
    tmp_path, monkeypatch, saved, restored, damaged_at, slab_bytes, data
):
    """Every block written in place (threshold lowered to 0): either the exact values, or,
    with one flipped data byte, a DataLossError and every array as it was. Regions that are
    not contiguous in the file go through slabs of one row (rows of 96 bytes), two, or all."""
    monkeypatch.setattr(targets_module, "IN_PLACE_MIN_BYTES", 0)
    monkeypatch.setattr(slabs, "SLAB_BYTES", slab_bytes)
    full = np.random.default_rng(len(saved[0])).standard_normal((48, 24)).astype(np.float32)

    def cuts(points, n):
        return sorted({0, n, *points})

    prefix = str(tmp_path / f"m{data.draw(st.integers(0, 1 << 40))}")
    ss.Saver({"w": blocks("w", full, cuts(saved[0], 48), cuts(saved[1], 24))}).save(prefix)
    targets = blocks("w", full, cuts(restored[0], 48), cuts(restored[1], 24), fill=9.0)
    owns = [t.value for t in targets]
    if damaged_at is None:
        ss.Saver({"w": targets}).restore(prefix)
        for t, own in zip(targets, owns, strict=True):
            # a whole small tensor takes the bulk path for small tensors (a new array)
            assert t.value is own or t.shape == full.shape
            np.testing.assert_array_equal(t.value, full[t.block_slices])
        return
    data_file = Path(prefix + DATA_FILE)
    damage(data_file, int(damaged_at * data_file.stat().st_size))
    with pytest.raises(ss.DataLossError, match="checksum does not match for tensor 'w'"):
        ss.Saver({"w": targets}).restore(prefix)
    for t, own in zip(targets, owns, strict=True):
        assert t.value is own and (own == 9.0).all()


def test_one_variable_restored_under_two_names_is_not_written_twice_at_once(tmp_path):
    a = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver(
        {"x": ss.Variable("x", a, register=False), "y": ss.Variable("y", -a, register=False)}
    ).save(str(tmp_path / "m"))
    v = ss.Variable("v", np.zeros_like(a), register=False)
    own = v.value
    ss.Saver({"x": v, "y": v}).restore(prefix)
    # one of the two tensors, whole (the other came as a new array and was adopted last)
    assert (v.value == a).all() or (v.value == -a).all()
    assert (own == a).all() or (own == -a).all()


def rewrite_entry(prefix: str, name: str, **fields) -> None:
    """Rewrite the index with ``name``'s entry changed (a well-formed index either way)."""
    index = Path(prefix + ".index")
    items = []
    for key, value in table.read_table(index.read_bytes()):
        if key == name.encode():
            value = BundleEntry.decode(value)._replace(**fields).encode()
        items.append((key, value))
    index.write_bytes(table.build_table(items))


def test_checksum_blocks_larger_than_the_scratch_buffer(tmp_path):
    """The block size is a field of the format: blocks of 4 MiB (over the 1 MiB that the
    first pass reads at a time) are checked whole."""
    a = np.arange(2 * 1 << 20, dtype=np.float32)  # 8 MiB
    prefix = ss.Saver([ss.Variable("a", a, register=False)]).save(str(tmp_path / "m"))
    _, packed = checksum_blocks(memoryview(a).cast("B"), 4 << 20)
    rewrite_entry(prefix, "a", block_size=4 << 20, block_crcs=packed)
    v = ss.Variable("a", np.zeros_like(a), register=False)
    own = v.value
    ss.Saver([v]).restore(prefix)
    assert v.value is own
    np.testing.assert_array_equal(own, a)


@pytest.mark.parametrize("in_place", [True, False])
def test_too_few_block_checksums_name_the_index_and_tensor(tmp_path, in_place):
    a = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver([ss.Variable("a", a, register=False)]).save(str(tmp_path / "m"))
    entry = ss.CheckpointReader(prefix).get_entries().entries["a"]
    rewrite_entry(prefix, "a", block_crcs=entry.block_crcs[: 4 * 20])
    v = ss.Variable("a", np.full_like(a, 7), register=False)
    with pytest.raises(
        ss.DataLossError, match=r"m\.index: tensor 'a' has 80 bytes of block checksums, 128 expected"
    ):
        ss.Saver([v], restore_in_place=in_place).restore(prefix)
    assert (v.value == 7).all()


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("block", [0, 5, 15, 16, 47])
def test_damage_is_reported_at_its_checksum_block(tmp_path, in_place, block):
    """Blocks are checked 16 at a time with one CRC (crc.run_crcs); a mismatch still names
    the 64 KiB block that differs, first, middle and last of a run alike."""
    a = np.arange(3 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver([ss.Variable("a", a, register=False)]).save(str(tmp_path / "m"))
    entry = ss.CheckpointReader(prefix).get_entries().entries["a"]
    assert entry.block_size == 65536
    damage(Path(prefix + DATA_FILE), entry.offset + block * 65536 + 1000)
    v = ss.Variable("a", np.full_like(a, 7), register=False)
    with pytest.raises(ss.DataLossError, match=rf"tensor 'a' \(bytes {entry.offset + block * 65536}\.\.\)"):
        ss.Saver([v], restore_in_place=in_place).restore(prefix)
    assert (v.value == 7).all()


def test_a_file_written_to_between_the_passes_is_reported(tmp_path, monkeypatch):
    """Rewriting a data file in place (cp over it, rsync --inplace) after it was checked:
    the restore raises, naming the file and the variables it may have left partial."""
    a = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)
    prefix = ss.Saver([ss.Variable("a", a, register=False)]).save(str(tmp_path / "m"))
    data_file = Path(prefix + DATA_FILE)
    check = in_place_module.InPlaceLoad.check

    def check_then_write(self, targets, stats):
        check(self, targets, stats)
        with open(data_file, "r+b") as f:
            f.seek(100)
            f.write(b"\x00" * 16)

    monkeypatch.setattr(in_place_module.InPlaceLoad, "check", check_then_write)
    v = ss.Variable("a", np.zeros_like(a), register=False)
    with pytest.raises(
        ss.DataLossError, match=rf"{data_file} changed while it was being restored.*\('a'\) hold partial"
    ):
        ss.Saver([v]).restore(prefix)


@pytest.mark.parametrize("failing_pass", [1, 2, "new arrays"])
def test_a_read_error_waits_for_the_other_reads_and_names_the_file(tmp_path, monkeypatch, failing_pass):
    """An I/O error (EIO, injected) in one read: the restore raises a DataLossError naming
    the file and the tensor only after every other read has stopped (a read still running
    could write into a variable, from whatever file reuses the descriptor). In the first
    pass, and when restoring into new arrays, no array is touched."""
    a = np.full(2 * MIB_OF_FLOATS, 1, np.float32)
    b = np.full(2 * MIB_OF_FLOATS, 2, np.float32)
    prefix = ss.Saver([ss.Variable("a", a, register=False), ss.Variable("b", b, register=False)]).save(
        str(tmp_path / "m")
    )
    real = os.preadv
    state = {"reads": 0, "running": 0, "failed": False}
    lock = threading.Lock()

    def preadv(fd, buffers, offset):
        with lock:
            state["reads"] += 1
            state["running"] += 1
            fail = not state["failed"] and (failing_pass != 2 or len(buffers[0]) == a.nbytes)
            state["failed"] |= fail
        try:
            if fail:
                raise OSError(errno.EIO, "Input/output error")
            time.sleep(0.05)  # the other reads are still running when the error comes
            return real(fd, buffers, offset)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(os, "preadv", preadv)
    va = ss.Variable("a", np.zeros_like(a), register=False)
    vb = ss.Variable("b", np.zeros_like(b), register=False)
    owns = va.value, vb.value
    with pytest.raises(ss.DataLossError, match=rf"{prefix}{DATA_FILE}.*Input/output error") as info:
        ss.Saver([va, vb], restore_in_place=failing_pass != "new arrays").restore(prefix)
    assert state["running"] == 0
    if failing_pass != 2:
        assert "reading tensor" in str(info.value)
        assert va.value is owns[0] and vb.value is owns[1]
        assert (va.value == 0).all() and (vb.value == 0).all()
    else:
        assert "hold partial values" in str(info.value)


@pytest.mark.parametrize("name", ["small", "big"])
def test_an_entry_in_a_shard_the_checkpoint_lacks_is_data_loss(tmp_path, name):
    """Small tensors (read in bulk) and large ones (checked, then read in place) alike."""
    values = {"small": np.arange(10, dtype=np.float32), "big": np.arange(2 * MIB_OF_FLOATS, dtype=np.float32)}
    prefix = ss.Saver({n: ss.Variable(n, v, register=False) for n, v in values.items()}).save(
        str(tmp_path / "m")
    )
    rewrite_entry(prefix, name, shard_id=3)
    targets = {n: ss.Variable(n, np.full_like(v, 7), register=False) for n, v in values.items()}
    with pytest.raises(
        ss.DataLossError, match=rf"m\.index: tensor '{name}' is in shard 3, but the checkpoint has 1"
    ):
        ss.Saver(targets).restore(prefix)
    assert all((v.value == 7).all() for v in targets.values())
