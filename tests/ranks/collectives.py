"""Run under mpiexec: shardsave's pickled collectives (``_comm/bounded.py``) on a Comm with a
2 s timeout. First every rank makes each of them (``bcast``, ``gather``, ``allgather``,
``scatter``, with a payload of 20 MB among them, and 20 gathers back to back) and checks what it got; then one rank
(``--absent``) skips ``--op`` while the others make it.

Every rank R writes one line per outcome to ``DIR/rank-R.out``: ``ok <op>`` for each
checked round trip, then ``<ErrorClass> after S s: <message>`` for the skipped call and for
the next call on the same Comm (refused: it is broken). tests/test_ranks.py checks them.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

from shardsave._comm import Comm

TIMEOUT = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--op", choices=["bcast", "gather", "allgather", "scatter"], required=True)
    parser.add_argument("--absent", type=int, required=True)
    args = parser.parse_args()
    comm = Comm.create(MPI.COMM_WORLD, timeout=TIMEOUT)
    rank, size = comm.rank, comm.size
    out = open(os.path.join(args.dir, f"rank-{rank}.out"), "w")  # noqa: SIM115

    def say(line: str) -> None:
        out.write(line.replace("\n", " ") + "\n")
        out.flush()

    big = np.arange(5 << 20, dtype=np.float32)  # 20 MB
    got = comm.bcast(big if rank == 1 else None, root=1)
    if np.array_equal(got, big):
        say("ok bcast")
    gathered = comm.gather({"rank": rank, "data": list(range(rank))}, root=size - 1)
    everyone = [{"rank": r, "data": list(range(r))} for r in range(size)]
    if gathered == (everyone if rank == size - 1 else None):
        say("ok gather")
    # back to back: a rank may send its next gather's object before the root took the first
    rounds = [comm.gather((rank, i)) for i in range(20)]
    if rounds == [[(r, i) for r in range(size)] if rank == 0 else None for i in range(20)]:
        say("ok gathers")
    if comm.allgather(("r", rank)) == [("r", r) for r in range(size)]:
        say("ok allgather")
    if comm.scatter([f"to {r}" * (r + 1) for r in range(size)] if rank == 0 else None) == f"to {rank}" * (
        rank + 1
    ):
        say("ok scatter")

    ops = {
        "bcast": lambda: comm.bcast("x" if rank == 0 else None),
        "gather": lambda: comm.gather(rank),
        "allgather": lambda: comm.allgather(rank),
        "scatter": lambda: comm.scatter(list(range(size)) if rank == 0 else None),
    }
    # every rank leaves at the same time, without MPI_Finalize (the others' collective never
    # completes): one that left first would make mpiexec kill the rest
    end = time.monotonic() + TIMEOUT + 3
    if rank != args.absent:
        for _ in range(2):  # the second is refused at once: the Comm is broken
            start = time.monotonic()
            try:
                ops[args.op]()
                say(f"{args.op} returned")
            except Exception as exc:  # noqa: BLE001 - reported for the test to check
                say(f"{type(exc).__name__} after {time.monotonic() - start:.1f} s: {exc}")
    out.close()
    time.sleep(max(0.0, end - time.monotonic()))  # the absent rank: alive, but never calling
    os._exit(0)


if __name__ == "__main__":
    main()
