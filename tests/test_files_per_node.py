"""``Saver(files_per_node=k)`` under real mpiexec: 8 ranks on 2 nodes simulated with
SHARDSAVE_NODE_ID (tests/files_job.py) write k data files per node; the checkpoints restore
bit-exact on 8 and 3 ranks, TensorFlow reads them, a damaged byte in a writer's file is
data loss, and a writer that cannot write or a member that raises fails the save on every
rank with the same error, leaving the previous checkpoint as it was."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import shardsave as ss
from shardsave.save.groups import file_groups
from tests import files_job
from tests.faults.common import run_mpi, run_nodes

JOB = "tests/files_job.py"
NODES = [("a", 4), ("b", 4)]
KS = [2, 1, 3]  # (k above a node's ranks: see the groups' test)
pytestmark = pytest.mark.mpi


def result(r) -> dict:
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"job failed ({r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(lines[0][len("RESULT ") :])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    out = result(run_nodes(NODES, [JOB, "save", "--dir", str(root), "--k", *map(str, KS)], timeout=300))
    return root, out


def test_k_files_per_node_and_bit_exact_restores_on_8_ranks(saved):
    root, out = saved
    for k in KS:
        n = 2 * min(k, 4)
        want = [f"model-1.data-{i:05d}-of-{n:05d}" for i in range(n)]
        if k == KS[0]:  # saved again, non-blocking
            want += [name.replace("model-1", "model-2") for name in want]
        assert out[str(k)] == want, k
    # the file of node b's writer with k=1 holds ranks 4-7, in rank order
    sizes = [os.path.getsize(root / "k1" / f"model-1.data-{i:05d}-of-00002") for i in range(2)]
    assert sizes[1] > 4 * sizes[0]  # rank 5 holds most of "big"


def test_restore_on_three_ranks(saved):
    root, _ = saved
    out = result(run_mpi(3, [JOB, "restore", "--dir", str(root), "--k", *map(str, KS)], timeout=300))
    assert out["restored"] == KS


def test_tensorflow_reads_every_layout(saved):
    tf = pytest.importorskip("tensorflow")
    root, _ = saved
    want = files_job.global_values(1, 8)
    for k in KS:
        prefix = str(root / f"k{k}" / "model-1")
        reader = tf.train.load_checkpoint(prefix)
        assert reader.get_variable_to_shape_map() == {name: list(np.shape(v)) for name, v in want.items()}
        for name, value in want.items():
            got = reader.get_tensor(name)
            if value.dtype == object:
                assert [bytes(x) for x in got] == list(value), (k, name)
            else:
                assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), (k, name)
    assert tf.train.load_variable(str(root / f"k{KS[0]}" / "model-2"), "step") == 2  # the non-blocking save


def test_s3(s3_server, s3_dir):
    """Writers write through the same storage layer (a fresh prefix on S3: the final names,
    then a create-only index PUT)."""
    opts = json.dumps(s3_server.options())
    args = [JOB, "save", "--dir", s3_dir, "--k", "2", "--once", "--storage-options", opts]
    out = result(run_nodes(NODES, args, env=s3_server.env(), timeout=300))
    assert out["2"] == [f"model-1.data-{i:05d}-of-00004" for i in range(4)]
    emb = ss.Variable("emb", np.zeros((files_job.EMB_ROWS, files_job.COLS), np.float32), register=False)
    ss.Saver([emb], storage_options=s3_server.options()).restore(f"{s3_dir}/k2/model-1")
    assert emb.value.tobytes() == files_job.global_values(1, 8)["emb"].tobytes()


def test_a_damaged_byte_in_a_writers_file_is_data_loss(saved, tmp_path):
    root, _ = saved
    for name in os.listdir(root / "k1"):
        if name.startswith("model-1."):
            shutil.copy(root / "k1" / name, tmp_path / name)
    damaged = tmp_path / "model-1.data-00001-of-00002"  # ranks 4-7; the middle is rank 5's "big"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    big = ss.Variable("big", np.zeros((files_job.BIG_ROWS, files_job.BIG_COLS), np.float32), register=False)
    saver = ss.Saver([big])
    with pytest.raises(ss.DataLossError, match="data-00001-of-00002"):
        saver.restore(str(tmp_path / "model-1"))
    assert not big.value.any()  # nothing changed
    emb = ss.Variable("emb", np.zeros((files_job.EMB_ROWS, files_job.COLS), np.float32), register=False)
    ss.Saver([emb]).restore(str(tmp_path / "model-1"))  # the other bytes are fine
    assert emb.value.tobytes() == files_job.global_values(1, 8)["emb"].tobytes()


def test_a_failing_writer_or_member_fails_every_rank_and_keeps_the_old_checkpoint(tmp_path):
    out = result(run_nodes(NODES, [JOB, "fail", "--dir", str(tmp_path), "--k", "1"], timeout=300))
    writer, member = out["writer"], out["member"]
    for name, case in out.items():
        assert len(set(case["errors"])) == 1 and case["errors"][0] is not None, case["errors"]
        assert case["after"] == case["before"] == ["model.data-00000-of-00002", "model.data-00001-of-00002"]
        assert not [n for n in os.listdir(tmp_path / f"fail-{name}") if "staged" in n or "pending" in n]
    assert "rank(s) 4:" in writer["errors"][0] and "File too large (EFBIG)" in writer["errors"][0]
    assert "data-00001-of-00002" in writer["errors"][0]
    # the member's own error, not a complaint of its writer about missing bytes
    assert "rank(s) 5:" in member["errors"][0] and "injected failure on rank 5" in member["errors"][0]


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_files_per_node_must_be_a_positive_integer(k):
    with pytest.raises(ss.InvalidArgumentError, match="files_per_node"):
        ss.Saver([ss.Variable("v", np.zeros(3), register=False)], files_per_node=k)


def test_groups_are_runs_of_a_nodes_ranks_numbered_by_their_writers():
    assert file_groups("aaaabbbb", 3).members == ((0, 1), (2,), (3,), (4, 5), (6,), (7,))
    assert file_groups("aaaabbbb", 1).members == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert file_groups("aaaabbbb", 9).members == tuple((r,) for r in range(8))  # one file per rank
    interleaved = file_groups("abababa", 2)  # nodes need not hold consecutive ranks
    assert interleaved.members == ((0, 2), (1, 3), (4, 6), (5,))
    assert interleaved.writers == (0, 1, 4, 5) and interleaved.shard_of[6] == 2
    assert interleaved.base(6, [10, 20, 30, 40, 50, 60, 70]) == 50


def test_one_process_with_more_files_per_node_than_ranks_writes_one_file(tmp_path):
    value = np.arange(50000, dtype=np.float32)
    var = ss.Variable("v", value.copy(), register=False)
    saver = ss.Saver([var], files_per_node=4)
    prefix = saver.save(str(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.glob("m.data-*")) == ["m.data-00000-of-00001"]
    var.assign(np.zeros_like(value))
    saver.restore(prefix)
    assert var.value.tobytes() == value.tobytes()
