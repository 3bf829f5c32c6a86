"""Run under mpiexec: one rank (``--absent``, default the last) never makes (or with
``--late``, makes only after the others gave up waiting for it) a collective call the others make.

``--case save|restore|constructor``. Every other rank R writes one line per outcome,
``<ErrorClass> after S s: <message>``, to ``DIR/rank-R.out`` (not to stdout, where mpiexec
may interleave the ranks' lines), which tests/test_ranks.py checks.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

import shardsave as ss

TIMEOUT = 2.0


OUT = ""


def say(rank: int, line: str) -> None:
    with open(os.path.join(OUT, f"rank-{rank}.out"), "a") as f:
        f.write(line.replace("\n", " ") + "\n")


def report(rank: int, start: float, exc: BaseException) -> None:
    say(rank, f"{type(exc).__name__} after {time.monotonic() - start:.1f} s: {exc}")


def variables(rank: int, size: int) -> dict:
    ss.reset_default_graph()
    block = ss.Variable(
        "rows", dtype=np.float32, shape=(2, 4), global_shape=(2 * size, 4), offset=(2 * rank, 0)
    )
    block.assign(np.full((2, 4), rank, np.float32))
    return {"rows": block}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--case", choices=["save", "restore", "constructor"], required=True)
    parser.add_argument(
        "--absent", type=int, default=-1, help="the rank that does not call (default: the last)"
    )
    parser.add_argument("--late", action="store_true", help="the absent rank calls, after the others gave up")
    args = parser.parse_args()
    global OUT
    OUT = args.dir
    os.makedirs(OUT, exist_ok=True)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    absent = args.absent % size
    prefix = os.path.join(args.dir, "ckpt")
    if args.case == "constructor":
        end = time.monotonic() + TIMEOUT + 3  # absent, but alive, until the others have given up
        if rank != absent:
            start = time.monotonic()
            try:
                ss.Saver(variables(rank, size), timeout=TIMEOUT)
                say(rank, "constructed")
            except ss.ShardsaveError as exc:
                report(rank, start, exc)
        time.sleep(max(0.0, end - time.monotonic()))
        os._exit(0)  # the others' duplication of COMM_WORLD never completes: skip MPI_Finalize
    saver = ss.Saver(variables(rank, size), timeout=TIMEOUT)
    if args.case == "restore":
        saver.save(prefix)
    if rank == absent:
        if not args.late:
            return
        time.sleep(2 * TIMEOUT + 1.5)  # longer than the others wait: timeout + grace
    start = time.monotonic()
    try:
        saver.save(prefix + "-2") if args.case == "save" else saver.restore(prefix)
        say(rank, f"{args.case} returned")
    except ss.ShardsaveError as exc:
        report(rank, start, exc)
    start = time.monotonic()
    try:  # the communicator is broken now: refused at once
        saver.save(prefix + "-3")
    except ss.ShardsaveError as exc:
        report(rank, start, exc)


if __name__ == "__main__":
    main()
