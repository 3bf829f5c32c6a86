"""A restore's index, once per node (shardsave/_comm/shared_bytes.py), under real mpiexec:
5 ranks on 3 nodes simulated with SHARDSAVE_NODE_ID (2 + 2 + 1; tests/ranks/shared_bytes.py).
The ranks of a node with more than one rank get one mapped copy, the rank alone on its
node a private one; the file is gone once they have it; restores are bit-exact; a
damaged index is DataLossError on every rank; without a usable shared directory every
rank gets a private copy and restores the same."""

from __future__ import annotations

import json
import os
import re

import pytest
from faults.common import run_nodes

HERE = os.path.dirname(os.path.abspath(__file__))
NODES = [("a", 2), ("b", 2), ("c", 1)]
pytestmark = pytest.mark.mpi


def run(tmp_path, shm_dir: str, *more: str) -> dict[int, dict]:
    script = os.path.join(HERE, "ranks", "shared_bytes.py")
    proc = run_nodes(NODES, [script, "--dir", str(tmp_path), "--shm-dir", shm_dir, *more], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {int(m[1]): json.loads(m[2]) for m in re.finditer(r"^rank (\d+): (.*)$", proc.stdout, re.M)}
    assert sorted(rows) == [0, 1, 2, 3, 4], proc.stdout
    return rows


def test_ranks_of_a_node_share_one_copy(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    (tmp_path / "ckpt").mkdir()
    rows = run(tmp_path / "ckpt", str(shm))
    assert {rank: row["type"] for rank, row in rows.items()} == {
        0: "mmap",  # the coordinator copies what it read into its node's file, and drops it
        1: "mmap",
        2: "mmap",
        3: "mmap",
        4: "bytearray",  # alone on node c
    }
    for rank, row in rows.items():
        assert row["same"] and row["restored"], (rank, row)
        assert row["left_in_shm"] == [], (rank, row)
        assert row["damaged"].startswith("DataLossError: ") and "ckpt.index" in row["damaged"], row
        assert "checksum does not match" in row["damaged"], row


def test_no_shared_directory_means_private_copies(tmp_path):
    rows = run(tmp_path, str(tmp_path / "missing"))
    for rank, row in rows.items():
        assert row["type"] == ("bytes" if rank == 0 else "bytearray"), (rank, row)
        assert row["same"] and row["restored"] and row["left_in_shm"] is None, (rank, row)
        assert row["damaged"].startswith("DataLossError: "), row


def test_a_leader_that_cannot_take_the_copy_fails_every_rank(tmp_path):
    """Node b's leader (rank 2) fails before the broadcast across the nodes: its node mate
    learns it in a bounded step, and the restore raises on every rank naming rank 2 and its
    error (in world ranks); nothing is left in the shared directory."""
    shm = tmp_path / "shm"
    shm.mkdir()
    rows = run(tmp_path, str(shm), "--fail-on", "b")
    for rank, row in rows.items():
        assert row["failed"] != "restored", (rank, row)
        assert "failed on rank(s) 2, 3: rank 2: MemoryError: injected: no" in row["failed"], (rank, row)
        assert "rank 2, the first rank of this node, did not receive" in row["failed"], (rank, row)
    assert os.listdir(shm) == []
