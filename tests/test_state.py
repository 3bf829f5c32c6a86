"""State in and out without stale copies (issue 13): Variables that use the caller's array,
trees of numpy arrays, torch tensors, JAX arrays and scalars, and per-rank state."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from faults.common import run_mpi

import shardsave as ss
from shardsave.format.names import METADATA_NAME

HERE = Path(__file__).parent
MIB_OF_FLOATS = (1 << 20) // 4


def damage(data_file: Path, at: int) -> None:
    raw = bytearray(data_file.read_bytes())
    raw[at] ^= 0xFF
    data_file.write_bytes(bytes(raw))


# ------------------------------------------------------------------ zero-copy Variable
@pytest.mark.parametrize("size", [4, 2 * MIB_OF_FLOATS])  # a small and an in-place-sized array
def test_updates_in_place_are_saved_and_restores_fill_the_callers_array(tmp_path, size):
    w = np.zeros(size, np.float32)
    var = ss.Variable("w", w, register=False)
    assert var.value is w and var.shares_memory
    w += 3  # the trap: a copy would save zeros
    prefix = ss.Saver([var]).save(str(tmp_path / "m"))
    np.testing.assert_array_equal(ss.load_variable(prefix, "w"), np.full(size, 3, np.float32))
    w2 = np.full(size, -1, np.float32)
    target = ss.Variable("w", w2, register=False)
    ss.Saver([target]).restore(prefix)
    assert target.value is w2
    np.testing.assert_array_equal(w2, np.full(size, 3, np.float32))


def test_copy_true_keeps_a_copy(tmp_path):
    w = np.zeros(4)
    var = ss.Variable("w", w, register=False, copy=True)
    assert not var.shares_memory and not np.shares_memory(var.value, w)
    w += 3
    prefix = ss.Saver([var]).save(str(tmp_path / "m"))
    np.testing.assert_array_equal(ss.load_variable(prefix, "w"), np.zeros(4))  # the copy, as before
    w[:] = 7
    ss.Saver([var]).restore(prefix)
    np.testing.assert_array_equal(w, 7)  # the caller's array is not the variable's
    var.assign(np.ones(4))
    assert (w == 7).all()


def test_assign_copies_into_the_shared_array():
    w = np.zeros((2, 2), np.float32)
    var = ss.Variable("w", w, register=False)
    var.assign([[1, 2], [3, 4]])
    assert var.value is w
    np.testing.assert_array_equal(w, [[1, 2], [3, 4]])
    var.assign(np.full((2, 2), 2.5, np.float64))  # cast to the dtype, as before
    assert w.dtype == np.float32 and (w == 2.5).all()
    with pytest.raises(
        ss.InvalidArgumentError, match=r"variable 'w': cannot assign shape \[4\] to shape \[2, 2\]"
    ):
        var.assign(np.zeros(4))
    assert (w == 2.5).all()
    w.flags.writeable = False
    with pytest.raises(ss.FailedPreconditionError, match="'w' shares an array that is no longer writable"):
        var.assign(np.zeros((2, 2)))


@pytest.mark.parametrize("kind", ["readonly", "strided", "dtype", "list", "object"])
def test_values_a_variable_cannot_share_are_copied(kind):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    value, dtype = base, None
    if kind == "readonly":
        value = base.copy()
        value.flags.writeable = False
    elif kind == "strided":
        value = base.T
    elif kind == "dtype":
        dtype = np.float64
    elif kind == "list":
        value = base.tolist()
    else:
        value = np.array([b"a", b"b"], dtype=object)
    var = ss.Variable("v", value, dtype=dtype, register=False)
    assert not var.shares_memory
    if isinstance(value, np.ndarray):
        assert not np.shares_memory(var.value, value)


def test_a_failed_restore_leaves_shared_arrays_untouched(tmp_path):
    big, small = np.arange(2 * MIB_OF_FLOATS, dtype=np.float32), np.arange(5.0)
    prefix = ss.Saver(
        [ss.Variable("big", big, register=False), ss.Variable("small", small, register=False)]
    ).save(str(tmp_path / "m"))
    damage(Path(prefix + ".data-00000-of-00001"), 100)  # inside "big"
    mine_big, mine_small = np.zeros_like(big), np.zeros_like(small)
    saver = ss.Saver(
        [ss.Variable("big", mine_big, register=False), ss.Variable("small", mine_small, register=False)]
    )
    with pytest.raises(ss.DataLossError):
        saver.restore(prefix)
    assert not mine_big.any() and not mine_small.any()


def test_a_shared_array_made_read_only_fails_the_restore_before_any_write(tmp_path):
    prefix = ss.Saver(
        {"a": ss.Variable("a", np.ones(3), register=False), "b": ss.Variable("b", np.ones(3), register=False)}
    ).save(str(tmp_path / "m"))
    a, b = np.zeros(3), np.zeros(3)
    saver = ss.Saver({"a": ss.Variable("a", a, register=False), "b": ss.Variable("b", b, register=False)})
    b.flags.writeable = False
    with pytest.raises(
        ss.FailedPreconditionError, match="variable 'b' shares an array that is no longer writable"
    ):
        saver.restore(prefix)
    assert not a.any()


def test_torch_tensors_are_shared_bfloat16_too(tmp_path):
    torch = pytest.importorskip("torch")
    f32 = torch.zeros(3)
    bf16 = torch.zeros(4, dtype=torch.bfloat16)
    v32, vbf = ss.Variable("f", f32, register=False), ss.Variable("b", bf16, register=False)
    assert v32.shares_memory and vbf.shares_memory and vbf.dtype == ml_dtypes.bfloat16
    f32 += 1.5
    bf16 += 2.5
    prefix = ss.Saver([v32, vbf]).save(str(tmp_path / "m"))
    assert ss.load_variable(prefix, "b").tolist() == [2.5] * 4
    with torch.no_grad():
        f32.zero_()
        bf16.zero_()
    ptrs = (f32.data_ptr(), bf16.data_ptr())
    ss.Saver([v32, vbf]).restore(prefix)
    assert (f32.data_ptr(), bf16.data_ptr()) == ptrs
    assert f32.tolist() == [1.5] * 3 and bf16.tolist() == [2.5] * 4


# ------------------------------------------------------------------------------ trees
Pair = collections.namedtuple("Pair", "left right")


def test_a_tree_of_numpy_arrays_is_saved_by_path_and_restored_in_place(tmp_path):
    tree = {
        "model": {"dense": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}},
        "layers": [np.arange(2.0), (np.arange(3), Pair(np.ones(1), np.zeros(1)))],
        "frozen": np.arange(4.0).reshape(2, 2).T,  # strided: shared as it is
    }
    saver = ss.Saver(tree)
    assert saver.state.names == [
        "model/dense/kernel", "model/dense/bias", "layers/0", "layers/1/0", "layers/1/1/0", "layers/1/1/1", "frozen",
    ]  # fmt: skip
    tree["model"]["dense"]["kernel"] *= 5
    tree["frozen"] += 1
    prefix = saver.save(str(tmp_path / "m"))
    assert ss.load_variable(prefix, "model/dense/kernel").tolist() == [[5.0] * 3] * 2
    np.testing.assert_array_equal(ss.load_variable(prefix, "frozen"), np.arange(4.0).reshape(2, 2).T + 1)
    for name in saver.state.names:
        leaf = _at(tree, name)
        leaf[...] = -1
    ids = {name: id(_at(tree, name)) for name in saver.state.names}
    got = saver.restore(prefix)
    assert isinstance(got["layers"][1], tuple) and isinstance(got["layers"][1][1], Pair)
    for name in saver.state.names:
        assert id(_at(got, name)) == ids[name]  # the same objects, filled in place
    assert got["model"]["dense"]["kernel"].tolist() == [[5.0] * 3] * 2
    np.testing.assert_array_equal(got["frozen"], np.arange(4.0).reshape(2, 2).T + 1)
    np.testing.assert_array_equal(got["layers"][1][0], np.arange(3))


def _at(tree, name: str):
    for key in name.split("/"):
        tree = tree[int(key)] if isinstance(tree, list | tuple) else tree[key]
    return tree


def test_scalars_and_none(tmp_path):
    tree = {"step": 7, "lr": 0.5, "on": True, "tag": "run-1", "raw": b"\x00\x01", "f32": np.float32(1.25), "z": 2j,
            "unused": None, "ids": [0, 1]}  # fmt: skip
    saver = ss.Saver(tree)
    assert "unused" not in saver.state.names
    prefix = saver.save(str(tmp_path / "m"))
    assert ss.load_variable(prefix, "step") == 7 and ss.load_variable(prefix, "step").dtype == np.int64
    assert "unused" not in dict(ss.list_variables(prefix))
    fresh = {"step": 0, "lr": 0.0, "on": False, "tag": "", "raw": b"", "f32": np.float32(0), "z": 0j, "unused": None,
             "ids": [5, 5]}  # fmt: skip
    got = ss.Saver(fresh).restore(prefix)
    assert got == {**tree, "f32": np.float32(1.25)}
    for key in tree:
        assert type(got[key]) is type(tree[key]), key
    assert got is fresh and fresh["step"] == 7  # new Python values, put into the caller's dict


def test_assign_gives_a_tree_saver_new_values_all_or_nothing(tmp_path):
    a = np.zeros(2)
    saver = ss.Saver({"a": a, "n": 1, "none": None})
    with pytest.raises(
        ss.InvalidArgumentError, match=r"tree leaf 'a': cannot assign shape \[3\] to shape \[2\]"
    ):
        saver.state.assign({"a": np.ones(3), "n": 5, "none": None})
    assert saver.state.restored() == {"a": a, "n": 1, "none": None}
    with pytest.raises(ss.InvalidArgumentError, match=r"another structure.*missing \['n'\]"):
        saver.state.assign({"a": np.ones(2), "none": None})
    with pytest.raises(ss.InvalidArgumentError, match="'none' was None"):
        saver.state.assign({"a": np.ones(2), "n": 2, "none": 3})
    saver.state.assign({"a": np.ones(2), "n": 5, "none": None})
    assert (a == 1).all() and saver.state.restored()["n"] == 5
    prefix = saver.save(str(tmp_path / "m"))
    assert ss.load_variable(prefix, "n") == 5


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"a/b": np.zeros(1), "a": {"b": np.ones(1)}}, "two leaves of the tree are named 'a/b'"),
        ({0: np.zeros(1), "0": np.ones(1)}, "two leaves of the tree are named '0'"),
        ({"a": {"": np.zeros(1)}}, "tree key '' under 'a': a key must be non-empty"),
        ({"a": {"/x": np.zeros(1)}}, "tree key '/x' under 'a'"),
        ({"a": {"x/": np.zeros(1)}}, "tree key 'x/' under 'a'"),
        (
            {("a", 1): np.zeros(1)},
            r"tree key \('a', 1\) \(tuple\) under 'the root': keys must be strings or integers",
        ),
        ({"m": {True: np.zeros(1)}}, r"tree key True \(bool\) under 'm'"),
        ({"m": {"x": object()}}, r"tree leaf 'm/x' is a builtins.object: a tree's leaves are"),
        ({"m": [{1, 2}]}, r"tree leaf 'm/0' is a builtins.set"),
        ({"big": 2**70}, "tree leaf 'big': the int 1180591620717411303424 does not fit in an int64"),
        ({METADATA_NAME: np.zeros(1)}, "reserved for the metadata"),
        (np.zeros(3), "a tree must be a dict, list or tuple"),
    ],
)
def test_trees_that_cannot_be_named_are_rejected(tree, message):
    with pytest.raises(ss.InvalidArgumentError, match=message):
        ss.Saver(tree)


def test_the_saver_follows_objects_the_caller_puts_in_the_tree(tmp_path):
    """A training loop replaces leaves (``state["step"] = step``, a new params dict): a save
    stores what the tree holds then, a restore puts the values back into the tree."""
    state = {"step": 0, "lr": 0.5, "params": {"w": np.zeros(3, np.float32)}, "pair": (np.zeros(2), 1)}
    saver = ss.Saver(state)
    state["step"] = 12
    state["lr"] = 1  # an int where a float was: cast
    state["params"] = {"w": np.full(3, 2, np.float32)}  # a new dict and array
    state["pair"] = (np.ones(2), 5)  # a new tuple
    prefix = saver.save(str(tmp_path / "m"))
    assert ss.load_variable(prefix, "step") == 12 and ss.load_variable(prefix, "lr") == 1.0
    assert ss.load_variable(prefix, "params/w").tolist() == [2, 2, 2]
    assert ss.load_variable(prefix, "pair/1") == 5 and ss.load_variable(prefix, "pair/0").tolist() == [1, 1]
    mine = state["params"]["w"]
    state["step"], state["lr"] = 0, 0.0
    mine[:] = 0
    got = saver.restore(prefix)
    assert got is state and state["step"] == 12 and type(state["lr"]) is float and state["lr"] == 1.0
    assert state["params"]["w"] is mine and mine.tolist() == [2, 2, 2]  # in place, in the new array
    state["params"]["w"] = np.zeros(3, np.float64)
    with pytest.raises(
        ss.InvalidArgumentError,
        match=r"'params/w' was replaced by a float64\[3\]; the Saver was made with a float32\[3\]",
    ):
        saver.save(str(tmp_path / "m2"))
    state["params"] = {}
    with pytest.raises(
        ss.InvalidArgumentError, match="tree leaf 'params/w' is no longer in the Saver's tree"
    ):
        saver.restore(prefix)
    assert not (tmp_path / "m2.index").exists()


def test_a_mapping_of_variables_is_still_tf_s_form():
    saver = ss.Saver({"x/y": ss.Variable("v", np.zeros(2), register=False)})
    assert saver.state is None
    assert ss.Saver({"x/y": np.zeros(2)}).state.names == ["x/y"]


def test_torch_model_and_adam_restored_in_place_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def step(model, opt, seed):
        torch.manual_seed(seed)
        opt.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()

    model, opt = build()
    step(model, opt, 1)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3}
    saver = ss.Saver(state)
    prefix = saver.save(str(tmp_path / "ckpt"))
    step(model, opt, 2)  # what the checkpoint should give back is the state after step 1
    expected = [p.detach().clone() for p in model.parameters()]
    expected_opt = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    step(model, opt, 3)  # move on, then go back
    ptrs = {name: t.data_ptr() for name, t in state["model"].items()}
    got = saver.restore(prefix)
    assert got is state and got["model"] is state["model"] and got["epoch"] == 3
    for name, tensor in got["model"].items():
        assert tensor is state["model"][name] and tensor.data_ptr() == ptrs[name]  # in place
    assert (
        opt.state_dict()["state"][0]["exp_avg"].data_ptr() == got["optim"]["state"][0]["exp_avg"].data_ptr()
    )
    opt.load_state_dict(got["optim"])
    step(model, opt, 2)  # the same step again from the restored state: bit-exact
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.detach().view(torch.int32), e.view(torch.int32))
    for k, v in opt.state_dict()["state"].items():
        for n, t in v.items():
            assert torch.equal(t, expected_opt[k][n]), (k, n)


def test_jax_tree_restores_as_new_jax_arrays_bit_exact(tmp_path):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    key = jax.random.PRNGKey(0)
    params = {
        "dense": {"kernel": jax.random.normal(key, (3, 4)), "bias": jnp.arange(4, dtype=jnp.bfloat16)},
        "count": jnp.int32(5),
    }
    prefix = ss.Saver({"params": params, "step": 10}).save(str(tmp_path / "m"))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    empties = jax.tree_util.tree_leaves(zeros)
    saver = ss.Saver({"params": zeros, "step": 0})
    got = saver.restore(prefix)
    assert got["params"] is zeros  # the caller's dicts now hold the new arrays
    assert jax.tree_util.tree_structure(got["params"]) == jax.tree_util.tree_structure(params)
    leaves = jax.tree_util.tree_leaves
    for new, old, empty in zip(leaves(got["params"]), leaves(params), empties, strict=True):
        assert isinstance(new, jax.Array) and new.dtype == old.dtype and new is not empty
        assert np.asarray(new).tobytes() == np.asarray(old).tobytes()
        assert not np.asarray(empty).any()  # immutable: the tree given is unchanged
    assert got["step"] == 10 and saver.state.restored()["params"]["count"] is got["params"]["count"]
    # assign adopts new JAX arrays as they are; the next save stores them
    newer = jax.tree_util.tree_map(lambda x: x + 1, got["params"])
    saver.state.assign({"params": newer, "step": 11})
    assert saver.state.restored()["params"]["dense"]["kernel"] is newer["dense"]["kernel"]
    prefix2 = saver.save(str(tmp_path / "m2"))
    np.testing.assert_array_equal(
        ss.load_variable(prefix2, "params/dense/kernel"), np.asarray(newer["dense"]["kernel"])
    )


def test_shardsave_imports_neither_torch_nor_jax():
    code = (
        "import sys, numpy as np, tempfile, os\n"
        "sys.modules['torch'] = None; sys.modules['jax'] = None  # any import of them fails\n"
        "import shardsave as ss\n"
        "s = ss.Saver({'a': np.ones(2), 'b': [1, 2.0]}); p = s.save(os.path.join(tempfile.mkdtemp(), 'c'))\n"
        "print(s.restore(p)['b'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[1, 2.0]", out.stderr


@pytest.mark.tf
def test_tensorflow_reads_a_tree_checkpoint_by_its_paths(tmp_path):
    tf = pytest.importorskip("tensorflow")
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {
        "model": {"dense": {"kernel": kernel}},
        "opt": {"state": {0: {"step": 4}}},
        "rng": ss.PerRank(np.arange(3)),
    }
    prefix = ss.Saver(tree).save(str(tmp_path / "m"))
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    assert shapes == {"model/dense/kernel": [2, 3], "opt/state/0/step": [], "rng": [1, 3]}
    np.testing.assert_array_equal(reader.get_tensor("model/dense/kernel"), kernel)
    assert reader.get_tensor("opt/state/0/step") == 4
    np.testing.assert_array_equal(reader.get_tensor("rng"), [[0, 1, 2]])


# -------------------------------------------------------------------------- per-rank
def test_per_rank_on_one_rank(tmp_path):
    rng = np.arange(3)
    prefix = ss.Saver({"rng": ss.PerRank(rng), "pos": ss.PerRank(5)}).save(str(tmp_path / "m"))
    assert ss.load_variable(prefix, "rng").shape == (1, 3) and ss.load_variable(prefix, "pos").tolist() == [5]
    mine = np.zeros(3, np.int64)
    got = ss.Saver({"rng": ss.PerRank(mine), "pos": ss.PerRank(0)}).restore(prefix)
    assert got["rng"].value is mine and mine.tolist() == [0, 1, 2] and got["pos"].value == 5
    state = {"pos": ss.PerRank(0)}
    saver = ss.Saver(state)
    state["pos"] = ss.PerRank(41)  # an iterator's new position, in a new wrapper
    assert ss.load_variable(saver.save(str(tmp_path / "p")), "pos").tolist() == [41]
    state["pos"] = 42
    with pytest.raises(
        ss.InvalidArgumentError, match="tree leaf 'pos' was a PerRank: put a PerRank in its place"
    ):
        saver.save(str(tmp_path / "p"))
    with pytest.raises(ss.InvalidArgumentError, match="on_resize must be one of"):
        ss.PerRank(mine, on_resize="first")
    with pytest.raises(ss.InvalidArgumentError, match=r"per-rank variable 'rng' has rows of shape \[4\]"):
        ss.Saver({"rng": ss.PerRank(np.zeros(4, np.int64))}).restore(prefix)


def test_per_rank_torch_rng_state_restored_in_place(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    saved = torch.get_rng_state()
    prefix = ss.Saver({"torch_rng": ss.PerRank(saved)}).save(str(tmp_path / "m"))
    mine = torch.zeros_like(saved)
    got = ss.Saver({"torch_rng": ss.PerRank(mine)}).restore(prefix)
    assert got["torch_rng"].value is mine and torch.equal(mine, saved)
    torch.set_rng_state(mine)
    after_restore = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after_restore, torch.rand(3))


def _per_rank(n: int, phase: str, directory: Path) -> dict[int, dict]:
    script = str(HERE / "ranks" / "per_rank.py")
    proc = run_mpi(n, [script, "--phase", phase, "--dir", str(directory)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = {
        int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^rank (\d+): (.*)$", proc.stdout, re.M)
    }
    assert sorted(found) == list(range(n)), proc.stdout
    return found


def test_per_rank_state_under_mpiexec(tmp_path):
    """Saved on 2 ranks: each of 2 ranks gets its own rows back in place; 3 ranks get a
    FailedPreconditionError naming the variable and both counts, nothing changed, unless
    they ask for all rows."""
    _per_rank(2, "save", tmp_path)
    prefix = str(tmp_path / "ckpt")
    assert ss.load_variable(prefix, "rng").tolist() == [[0, 0, 0], [1, 1, 1]]
    assert ss.load_variable(prefix, "data/position").tolist() == [100, 101]
    assert ss.load_variable(prefix, "generator").shape == (2, 256)
    for rank, out in _per_rank(2, "restore", tmp_path).items():
        got = out["restored"]
        assert got["rng"] == [rank] * 3 and got["rng_in_place"], out
        assert got["position"] == 100 + rank and got["generator_in_place"] and got["generator_equal"], out
        assert got["model"] == list(np.arange(6.0)), out
    for out in _per_rank(3, "restore", tmp_path).values():
        assert re.search(
            r"per-rank variable '(rng|data/position|generator)' was saved on 2 ranks, this job has 3",
            out["error"],
        ), out
        assert "on_resize='all_rows'" in out["error"] and out["unchanged"], out
        rows = out["all_rows"]
        assert rows["rng"] == [[0, 0, 0], [1, 1, 1]] and rows["wrapper_kept"], out
        assert rows["spread"] == [[0.0, 0.0], [10.0, 10.0]] and rows["position"] == [100, 101], out
        assert rows["own_unchanged"], out
