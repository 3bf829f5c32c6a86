"""Crafted indexes (issue 11): an index whose checksums were recomputed after editing is
input, not trusted code. Every reading path (list_variables, CheckpointReader, the
``shardsave inspect`` CLI, Saver.restore into new arrays, in place, onto other layouts, and
the bulk path of small tensors) may only raise a DataLossError: no crash, no other
exception, no allocation the files do not justify, no variable half-written.

The cases that crashed or allocated gigabytes before they were closed run in a subprocess
under an address-space limit (crafting.every_path_isolated).
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
from crafting import (
    Crafted,
    every_path,
    every_path_isolated,
    save_standard,
    standard_layouts,
    standard_values,
    variables,
)

import shardsave as ss
from shardsave.format import crc
from shardsave.format.coding import encode_varint
from shardsave.format.index import entry_key

EMB_PIECE = entry_key("emb", [(0, 256), (0, 1024)])
"""The first of the two stored pieces of ``emb`` (rows 0..256, 1 MiB)."""
RESTORES = [
    f"restore:{layout}:{how}" for layout in ("same", "rows", "cols") for how in ("in_place", "new", "direct")
]
TENSOR_READS = ["get_tensor", "inspect", "inspect_checkpoint"]
EVERY_PATH = ["list_variables", "reader", *TENSOR_READS, *RESTORES]
MEMORY_BOUND = 64 << 20
"""Traced allocations of all the paths at once stay under this (the checkpoint is 2 MiB)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    return save_standard(str(tmp_path_factory.mktemp("standard")))


@pytest.fixture
def crafted(saved, tmp_path) -> Crafted:
    """A fresh copy of the standard checkpoint, parsed for editing."""
    directory = tmp_path / "ckpt"
    shutil.copytree(saved.rsplit("/", 1)[0], directory)
    return Crafted.load(str(directory / "m"))


def assert_only_data_loss(outcomes: dict, failing: list[str], match: str) -> None:
    """Every path succeeded or raised a ShardsaveError; those in ``failing`` a DataLossError
    whose message contains ``match``."""
    for path, result in outcomes.items():
        if path == "peak_bytes":
            continue
        assert result == "ok" or result.startswith("ShardsaveError:"), f"{path}: {result}"
    for path in failing:
        assert outcomes[path].startswith("ShardsaveError:"), f"{path} did not fail: {outcomes[path]}"
        assert match in outcomes[path], f"{path}: {outcomes[path]}"
        if not path.startswith("inspect"):  # the CLIs print the message, not the class
            assert outcomes[path].startswith("ShardsaveError:DataLossError"), f"{path}: {outcomes[path]}"


def traced(prefix: str) -> dict:
    """``every_path`` in this process, with the peak of traced allocations."""
    tracemalloc.start()
    try:
        out = every_path(prefix, standard_layouts())
        out["peak_bytes"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out


# ------------------------------------------------------------------ memory safety


@pytest.mark.parametrize("with_blocks", [True, False], ids=["block-crcs", "one-crc"])
def test_a_piece_turned_string_is_never_an_object_array_over_file_bytes(crafted, with_blocks):
    """The rank died with SIGSEGV: the in-place fill onto another layout made a numpy object
    array over the raw float bytes. Size doubled so it still fits the file; checksums of the
    bytes really there."""
    e = crafted.get(EMB_PIECE)
    crafted.set(EMB_PIECE, dtype=7, size=2 * e.size)
    if not with_blocks:
        crafted.set(EMB_PIECE, block_size=0, block_crcs=b"")
    crafted.fix_crcs(EMB_PIECE).save()
    outcomes = every_path_isolated(crafted.prefix)
    assert_only_data_loss(outcomes, TENSOR_READS + RESTORES, "has dtype string, its tensor float32")


def test_no_array_over_file_bytes_is_ever_of_dtype_object():
    """The last guard, whatever the plan says: strings come only from the string decoder."""
    from shardsave.restore import slabs

    with pytest.raises(ss.DataLossError, match="object"):
        slabs.file_array(memoryview(bytearray(64)), (8,), np.dtype(object))


# ------------------------------------------------------------------ pieces agree with their tensor


@pytest.mark.parametrize(
    ("dtype", "size_factor", "name"), [(3, 1, "int32"), (2, 1, "float64"), (2, 2, "float64")]
)
def test_a_piece_of_another_dtype_is_data_loss_before_any_byte_is_read(crafted, dtype, size_factor, name):
    """int32 (same size) was restored cast; float64 of the float32 size passed the in-place
    check and failed in the fill with the variables half-written."""
    crafted.set(EMB_PIECE, dtype=dtype, size=size_factor * crafted.get(EMB_PIECE).size).fix_crcs(
        EMB_PIECE
    ).save()
    assert_only_data_loss(
        traced(crafted.prefix), TENSOR_READS + RESTORES, f"has dtype {name}, its tensor float32"
    )


@pytest.mark.parametrize("mode", [True, "direct"])
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_an_in_place_restore_of_a_bad_piece_leaves_every_variable_untouched(crafted, layout, mode):
    """The float64-sized-as-float32 piece failed in the second pass (TypeError, variables
    half-written); now the plan rejects it and no array changes (in one pass too: the
    plan is checked before a byte is read)."""
    crafted.set(EMB_PIECE, dtype=2).fix_crcs(EMB_PIECE).save()
    var_list = variables(standard_layouts()[layout])
    owns = {id(v.value): v.value.copy() for vs in var_list.values() for v in vs}
    saver = ss.Saver(var_list, restore_in_place=mode)
    with pytest.raises(ss.DataLossError, match="dtype float64, its tensor float32"):
        saver.restore(crafted.prefix)
    for vs in var_list.values():
        for v in vs:
            assert id(v.value) in owns
            np.testing.assert_array_equal(v.value, owns[id(v.value)])


@pytest.mark.parametrize(
    ("extents", "match"),
    [
        ([(0, 256)], "has rank 1"),  # the slice key of another rank: ValueError
        ([(0, 256), (0, 1024), (0, 1)], "has rank 3"),
        ([(400, 256), (0, 1024)], "does not lie inside"),  # rows 400..656 of 512
        ([(0, 256), (512, 1024)], "does not lie inside"),
    ],
)
def test_a_piece_outside_its_tensor_is_data_loss(crafted, extents, match):
    crafted.rename(EMB_PIECE, entry_key("emb", extents)).save()
    assert_only_data_loss(traced(crafted.prefix), TENSOR_READS + RESTORES, match)


def test_a_piece_whose_shape_is_not_its_extents_is_data_loss(crafted):
    crafted.set(EMB_PIECE, shape=(128, 2048)).save()  # same bytes, another shape
    assert_only_data_loss(traced(crafted.prefix), TENSOR_READS + RESTORES, "its extents say [256, 1024]")


def test_overlapping_pieces_are_data_loss(crafted):
    """Rows 0..256 and 128..384: as many elements as the tensor, rows 128..256 twice and
    384..512 never (restored as whatever np.empty held)."""
    crafted.rename(
        entry_key("emb", [(256, 256), (0, 1024)]), entry_key("emb", [(128, 256), (0, 1024)])
    ).save()
    assert_only_data_loss(traced(crafted.prefix), TENSOR_READS + RESTORES, "overlap")


# ------------------------------------------------------------------ bounded memory


@pytest.mark.parametrize("block_size", [1 << 30, 1 << 40])
def test_a_huge_checksum_block_size_is_data_loss_without_allocating_it(crafted, block_size):
    """2**30 zero-filled 1 GiB per thread; 2**40 raised a bare MemoryError. The block CRCs
    are consistent with the size (one block) and right for the bytes."""
    crafted.set(EMB_PIECE, block_size=block_size).fix_crcs(EMB_PIECE).save()
    outcomes = every_path_isolated(crafted.prefix)
    assert_only_data_loss(outcomes, TENSOR_READS + RESTORES, "crc32c_block_size")
    assert outcomes["peak_bytes"] < MEMORY_BOUND


def test_a_string_tensor_claiming_many_elements_allocates_nothing_for_them(crafted):
    """10**8 elements in 15 bytes: get_tensor allocated 800 MB of object array first."""
    crafted.set("s", shape=(10**8,)).save()
    outcomes = every_path_isolated(crafted.prefix)
    assert_only_data_loss(outcomes, TENSOR_READS, "too few for the 100000000 elements")
    assert outcomes["peak_bytes"] < MEMORY_BOUND


@pytest.mark.parametrize("name", ["s", "emb-piece", "small"])
def test_an_entry_larger_than_its_file_is_data_loss_before_allocating(crafted, name):
    """A string tensor's size of 2**40 raised MemoryError (its buffer was allocated before
    the read); any entry past its file's end is now refused when the restore is planned."""
    key = EMB_PIECE if name == "emb-piece" else name
    if name == "s":
        crafted.set(key, size=1 << 40)
    else:  # the right size for its shape, at an offset past the end
        crafted.set(key, offset=crafted.data_file(0).stat().st_size - 1)
    crafted.save()
    outcomes = every_path_isolated(crafted.prefix)
    failing = TENSOR_READS + (RESTORES if name != "s" else [r for r in RESTORES if r.endswith("new")])
    assert_only_data_loss(outcomes, failing, "past the end of the file")
    assert outcomes["peak_bytes"] < MEMORY_BOUND


def test_a_string_length_of_2_40_is_data_loss(crafted):
    """The string's stored length (a varint in the data file) is 2**40, the lengths' CRC and
    the entry's CRC recomputed: the string decoder checks it against the bytes there."""
    e = crafted.get("s")
    lengths = [1 << 40, 0, 6]
    value = 0
    for n in lengths:
        value = crc.crc32c((n & 0xFFFFFFFF).to_bytes(4, "little"), value)
    length_crc = crc.mask(value).to_bytes(4, "little")
    body = b"".join(map(encode_varint, lengths)) + length_crc + b"hi" + b"tensor"
    value = crc.crc32c(b"hi" + b"tensor", crc.crc32c(length_crc, value))
    data = bytearray(crafted.data_file(0).read_bytes())
    data[e.offset : e.offset + e.size] = body  # 5 bytes longer: the entries after it move
    crafted.data_file(0).write_bytes(bytes(data))
    for key, other in crafted.entries:
        if other.offset > e.offset:
            crafted.set(key, offset=other.offset + len(body) - e.size)
    crafted.set("s", size=len(body), crc32c=crc.mask(value)).save()
    outcomes = every_path_isolated(crafted.prefix)
    assert_only_data_loss(outcomes, TENSOR_READS + [r for r in RESTORES if r.endswith("new")], "'s'")
    assert outcomes["peak_bytes"] < MEMORY_BOUND


# ------------------------------------------------------------------ typed errors only


@pytest.mark.parametrize(
    ("key", "fields", "match"),
    [
        ("small", {"offset": 1 << 63}, "out of range"),  # OverflowError
        ("small", {"shard_id": 1 << 63}, "out of range"),
        ("small", {"size": 1 << 64}, "out of range"),
        (EMB_PIECE, {"offset": 1 << 63}, "out of range"),
        (EMB_PIECE, {"shard_id": (1 << 63) + 1}, "out of range"),
    ],
)
def test_offsets_sizes_and_shards_of_2_63_and_more_are_data_loss(crafted, key, fields, match):
    crafted.set(key, **fields).save()
    failing = EVERY_PATH if key != EMB_PIECE else TENSOR_READS + RESTORES  # pieces are parsed on use
    assert_only_data_loss(traced(crafted.prefix), failing, match)


@pytest.mark.parametrize("key", ["small", "emb"])
def test_an_unknown_dtype_is_data_loss(crafted, key):
    crafted.set(key, dtype=99).save()  # ValueError from the dtype map, get_tensor, inspect
    assert_only_data_loss(traced(crafted.prefix), ["reader", *TENSOR_READS, *RESTORES], "has dtype 99")


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1,) * 70, "at most 64 dimensions"),  # ValueError from numpy
        ((-10,), "none negative"),
        ((-2, -5), "none negative"),  # ten elements, as a reshape would want
        ((1 << 40, 1 << 40), "elements"),
    ],
)
def test_a_shape_no_array_can_have_is_data_loss(crafted, shape, match):
    crafted.set("small", shape=shape).save()
    outcomes = traced(crafted.prefix)
    assert_only_data_loss(outcomes, TENSOR_READS, match)
    reshaping = ss.Saver(variables({"small": [(np.zeros(10, np.float32), (10,), (0,))]}), reshape=True)
    with pytest.raises(ss.ShardsaveError):
        reshaping.restore(crafted.prefix)


def test_get_slice_of_a_negative_shape_is_data_loss(crafted):
    crafted.set("small", shape=(-10,)).save()
    with pytest.raises(ss.DataLossError, match="none negative"):
        ss.CheckpointReader(crafted.prefix).get_slice("small", slice(0, 2))


def test_a_name_that_is_not_utf8_is_data_loss(crafted):
    """debug_string raised UnicodeEncodeError (the name was kept as surrogate escapes)."""
    crafted.rename("small", b"sm\xffall").save()
    assert_only_data_loss(traced(crafted.prefix), EVERY_PATH, "is not UTF-8")


def test_the_standard_checkpoint_reads_on_every_path(crafted):
    """The harness itself: untouched, every path succeeds and gives the saved values."""
    outcomes = traced(crafted.prefix)
    assert all(outcomes[p] == "ok" for p in EVERY_PATH), outcomes
    reader = ss.CheckpointReader(crafted.prefix)
    for name, value in standard_values().items():
        got = reader.get_tensor(name)
        assert got.dtype == value.dtype and got.tolist() == value.tolist()


@pytest.mark.parametrize("dtype", [7, 2], ids=["string", "float64"])
def test_every_rank_of_a_reshard_raises_and_no_variable_changes(crafted, tmp_path, dtype):
    """Two real ranks restore onto another layout, rank 0 in place: the crafted piece (the
    one that crashed the rank, or failed it in the fill) is DataLossError on both, before
    either writes anything."""
    from faults.common import run_mpi

    e = crafted.get(EMB_PIECE)
    crafted.set(EMB_PIECE, dtype=dtype, size=2 * e.size if dtype == 7 else e.size).fix_crcs(EMB_PIECE).save()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "ranks"
    out.mkdir()
    proc = run_mpi(2, [os.path.join(here, "hostile_restore_rank.py"), crafted.prefix, str(out)], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for line in lines:
        assert line["error"].startswith(("DataLossError", "AbortedError")), line
        assert line["untouched"], line
    assert any("its tensor float32" in line["error"] for line in lines), lines


def test_the_overlap_check_agrees_with_comparing_every_pair():
    """checks._check_disjoint compares only pieces that overlap along one dimension."""
    import itertools
    import random

    from shardsave import storage
    from shardsave.plan import Block
    from shardsave.restore import checks

    rng = random.Random(11)
    loc = storage.resolve("/nonexistent/m")
    for _ in range(400):
        rank = rng.choice([1, 2, 3])
        pieces = [
            Block(
                tuple(rng.randrange(8) for _ in range(rank)), tuple(rng.randrange(0, 4) for _ in range(rank))
            )
            for _ in range(rng.randrange(2, 7))
        ]
        overlapping = any(a.intersect(b) is not None for a, b in itertools.combinations(pieces, 2))
        try:
            checks._check_disjoint(loc, "t", pieces)
        except ss.DataLossError:
            assert overlapping, pieces
        else:
            assert not overlapping, pieces
