"""Run under mpiexec on simulated nodes: a restore's index shared per node
(shardsave/_comm/shared_bytes.py; tests/test_shared_bytes.py).

The threshold is lowered so that a small checkpoint's index is shared. Every rank saves
its rows of a matrix and a replicated vector, the ranks restore them into zeroed arrays
on every rank and compare, then get a buffer through ``shared_bytes.coordinator_bytes`` as the
index is got, and a damaged index (one byte of a data block flipped) must be a
DataLossError on every rank. ``--shm-dir`` is where the node's copy is made (a missing
directory: no node can share). Rank 0 prints one line per rank: ``rank R: {...}``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from mpi4py import MPI

import shardsave as ss
from shardsave._comm import Comm, shared_bytes

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
ROWS, COLS = 4 * SIZE, 8


def variables(fill: bool) -> list:
    rows = np.arange(RANK * 4 * COLS, (RANK + 1) * 4 * COLS, dtype=np.float32).reshape(4, COLS)
    vector = np.arange(16, dtype=np.int64) * 3
    return [
        ss.Variable(
            "w",
            rows if fill else np.zeros_like(rows),
            global_shape=(ROWS, COLS),
            offset=(4 * RANK, 0),
            register=False,
        ),
        ss.Variable("v", vector if fill else np.zeros_like(vector), register=False),
    ]


def fail_on(node: str, prefix: str) -> None:
    """Save, then restore while the leader of ``node`` fails to allocate its copy: every
    rank raises (at worst the other leaders after the 5 s timeout of their broadcast), none hangs."""
    ss.Saver(variables(fill=True), timeout=5).save(prefix)
    leader = min(r for r, n in enumerate(COMM.allgather(os.environ["SHARDSAVE_NODE_ID"])) if n == node)

    def no_room(size):
        raise MemoryError(f"injected: no {size} bytes on node {node}")

    if leader == RANK:
        shared_bytes._create = no_room
    try:
        ss.Saver(variables(fill=False), timeout=5).restore(prefix)
        outcome = "restored"
    except Exception as exc:  # noqa: BLE001 - reported
        outcome = f"{type(exc).__name__}: {exc}"
    lines = COMM.gather(f"rank {RANK}: {json.dumps({'failed': outcome})}")
    if RANK == 0:
        print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--shm-dir", required=True)
    parser.add_argument("--fail-on", help="the leader of this node cannot allocate its copy")
    args = parser.parse_args()
    shared_bytes.SHARE_MIN_BYTES = 1
    shared_bytes.SHM_DIR = args.shm_dir
    prefix = os.path.join(args.dir, "ckpt")
    out: dict = {}
    if args.fail_on:
        fail_on(args.fail_on, prefix)
        return
    ss.Saver(variables(fill=True), timeout=60).save(prefix)
    restored = variables(fill=False)
    ss.Saver(restored, timeout=60).restore(prefix)
    out["restored"] = all(
        np.array_equal(a.value, b.value) for a, b in zip(restored, variables(fill=True), strict=True)
    )

    comm = Comm.create(timeout=60)
    payload = bytes(range(256)) * 1000
    buf = shared_bytes.coordinator_bytes(comm, "sharing", lambda: payload)
    out["type"] = type(buf).__name__
    out["same"] = bytes(buf) == payload
    COMM.Barrier()
    out["left_in_shm"] = sorted(os.listdir(args.shm_dir)) if os.path.isdir(args.shm_dir) else None

    COMM.Barrier()
    if RANK == 0:  # flip a byte in the middle of the index's first data block
        with open(prefix + ".index", "r+b") as f:
            f.seek(20)
            byte = f.read(1)
            f.seek(20)
            f.write(bytes([byte[0] ^ 0xFF]))
    COMM.Barrier()
    try:
        ss.Saver(variables(fill=False), timeout=60).restore(prefix)
        out["damaged"] = "restored"
    except ss.DataLossError as exc:
        out["damaged"] = f"DataLossError: {exc}"
    lines = COMM.gather(f"rank {RANK}: {json.dumps(out)}")
    if RANK == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
