"""Run under mpiexec (3 ranks): ranks that disagree on what to save or restore.

Each case prints (from rank 0) one line per rank, ``case NAME rank R: OK`` or ``case NAME rank R:
<ErrorClass>: <message>``, and the coordinator prints ``files NAME <json>``, the sha256 of
every file of the case's directory after it; tests/test_ranks.py checks both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
from mpi4py import MPI

import shardsave as ss

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def variables(rng_value: int = 7) -> dict:
    """``rows`` sharded by rows; ``shared`` and ``rng`` held whole by every rank;
    ``per_rank`` one row per rank (README: per-rank state has a leading rank axis)."""
    ss.reset_default_graph()
    rows = ss.Variable(
        "rows", dtype=np.float32, shape=(2, 4), global_shape=(2 * SIZE, 4), offset=(2 * RANK, 0)
    )
    rows.assign(np.full((2, 4), RANK, np.float32))
    shared = ss.Variable("shared", dtype=np.float64, shape=(3,))
    shared.assign(np.arange(3.0))
    rng = ss.Variable("rng", dtype=np.int64, shape=(2,))
    rng.assign(np.array([rng_value, 1], np.int64))
    per_rank = ss.Variable(
        "per_rank", np.array([[RANK, 10 * RANK]]), global_shape=(SIZE, 2), offset=(RANK, 0)
    )
    return {"rows": rows, "shared": shared, "rng": rng, "per_rank": per_rank}


def outcome(case: str, fn) -> None:
    try:
        fn()
        line = f"case {case} rank {RANK}: OK"
    except ss.ShardsaveError as exc:
        line = f"case {case} rank {RANK}: {type(exc).__name__}: {exc}"
    lines = COMM.gather(line.replace("\n", " "))  # one printer: mpiexec may interleave long lines
    if RANK == 0:
        print("\n".join(lines), flush=True)


def files(case: str, directory: str) -> None:
    if RANK == 0:
        digests = {}
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                digests[name] = hashlib.sha256(f.read()).hexdigest()
        print(f"files {case} {json.dumps(digests)}", flush=True)
    COMM.Barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    prefix = os.path.join(args.dir, "agree", "ckpt")
    saver = ss.Saver(variables(), timeout=30)
    saver.save(prefix, global_step=1)
    files("before", os.path.dirname(prefix))
    # the coordinator's step lags: it would re-save ckpt-1 while the others write ckpt-2
    outcome("prefix", lambda: saver.save(prefix, global_step=1 if RANK == 0 else 2))
    outcome("step", lambda: saver.save(prefix, global_step="x" if RANK == 1 else 3))  # fails on rank 1 alone
    outcome("option", lambda: saver.save(prefix, global_step=3, write_state=RANK != 1))
    outcome("path", lambda: saver.restore(prefix + ("-1" if RANK != 2 else "-9")))
    outcome("call", lambda: saver.restore(prefix + "-1") if RANK == 2 else saver.save(prefix, global_step=4))
    files("after", os.path.dirname(prefix))
    # one relative prefix, but every rank in another working directory: another place each
    home = os.getcwd()
    os.makedirs(os.path.join(args.dir, f"cwd-{RANK}"))
    os.chdir(os.path.join(args.dir, f"cwd-{RANK}"))
    outcome("cwd", lambda: saver.save("rel/ckpt", global_step=5))
    os.chdir(home)
    outcome("restore", lambda: saver.restore(prefix + "-1"))  # still usable, still intact

    replicas = os.path.join(args.dir, "replicas", "ckpt")
    outcome("differ", lambda: ss.Saver(variables(7 + (RANK == 1))).save(replicas))
    files("differ", os.path.dirname(replicas))
    outcome("equal", lambda: ss.Saver(variables()).save(replicas))
    unchecked = os.path.join(args.dir, "unchecked", "ckpt")
    outcome("unchecked", lambda: ss.Saver(variables(7 + (RANK == 1)), check_replicas=False).save(unchecked))


if __name__ == "__main__":
    main()
