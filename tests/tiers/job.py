"""A training loop on ss.CheckpointManager with a fast tier, run under mpiexec on
simulated nodes (tests/faults/common.run_nodes sets SHARDSAVE_NODE_ID per node):

    mpiexec -n 2 -env SHARDSAVE_NODE_ID a python -m mpi4py tests/tiers/job.py ARGS : ...

    --durable D --local L ('{node}' in it) --redundancy none|partner|xor [--group G]
    --steps T [--persist K] [--local-keep K] [--interval I] [--kill-at S] [--no-close]
    [--cols C] [--timeout T] [--persist-at-close]

Every rank holds its rows of ``w`` (a pure function of the step, so any process can check
what it restored) and the replicated ``step``. ``--kill-at S``: the last rank SIGKILLs
itself right after ``save(S)`` returns (the non-blocking save still running). Rank 0
prints ``RESULT {json}``: per rank, the step restored, whether its rows are bit-exact,
``mgr.restored_from`` and the steps saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

import numpy as np
from mpi4py import MPI

import shardsave as ss

ROWS = 48


def value(step: int, cols: int) -> np.ndarray:
    return np.random.default_rng([5, step]).standard_normal((ROWS, cols)).astype(np.float32)


def rows(rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(ROWS, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--durable", required=True)
    p.add_argument("--local", required=True)
    p.add_argument("--redundancy", default="partner")
    p.add_argument("--group", type=int, default=2)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--persist", type=int, default=10)
    p.add_argument("--local-keep", type=int, default=2)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--no-close", action="store_true", help="exit without close() (pending work at exit)")
    p.add_argument("--cols", type=int, default=1000, help="columns of w (rows are sharded over the ranks)")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--persist-at-close", action="store_true", help="close(persist=True)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    lo, hi = rows(rank, size)
    w = ss.Variable(
        "w",
        np.zeros((hi - lo, args.cols), np.float32),
        global_shape=(ROWS, args.cols),
        offset=(lo, 0),
        register=False,
    )
    step_var = ss.Variable("step", np.int64(-1), register=False)
    mgr = ss.CheckpointManager(
        args.durable,
        [w, step_var],
        max_to_keep=3,
        save_interval_steps=args.interval,
        local_directory=args.local,
        local_max_to_keep=args.local_keep,
        persist_interval_steps=args.persist,
        redundancy=args.redundancy,
        redundancy_group_size=args.group,
        timeout=args.timeout,
    )
    start = mgr.restore_or_initialize()
    exact = None
    if start is not None:
        exact = bool(np.array_equal(w.value, value(start, args.cols)[lo:hi]) and int(step_var.value) == start)
    saved = []
    for step in range(start + 1 if start is not None else 0, args.steps):
        w.assign(value(step, args.cols)[lo:hi])  # "training": the state after `step` steps
        step_var.assign(np.int64(step))
        if mgr.should_save(step):
            mgr.save(step)
            saved.append(step)
            if args.kill_at == step and rank == size - 1:
                os.kill(os.getpid(), signal.SIGKILL)
        if mgr.reached_preemption(step):
            break
    report = {
        "rank": rank,
        "node": os.environ.get("SHARDSAVE_NODE_ID"),
        "start": start,
        "exact": exact,
        "restored_from": mgr.restored_from,
        "saved": saved,
    }
    if not args.no_close:
        mgr.close(persist=args.persist_at_close)
    everyone = comm.gather(report)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)


if __name__ == "__main__":
    main()
