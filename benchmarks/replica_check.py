"""What comparing replicas costs: a save of one replicated variable, with and without
``Saver(check_replicas=...)``, alternating, under mpiexec.

    mpiexec -n 2 .venv/bin/python -m mpi4py benchmarks/replica_check.py --dir /tmp/rc --mib 256

Prints, per fsync setting, the median (and all) wall times of a save, the slowest rank's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

import shardsave as ss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    value = np.random.default_rng(0).standard_normal(args.mib << 18).astype(np.float32)  # same on every rank
    for fsync in (False, True):
        times: dict[bool, list[float]] = {True: [], False: []}
        savers = {}
        for check in (True, False):
            ss.reset_default_graph()
            var = ss.Variable("replicated", value)
            savers[check] = ss.Saver({"replicated": var}, check_replicas=check, fsync=fsync, max_to_keep=1)
        for run in range(args.runs + 1):  # the first pair warms up
            for check in (True, False) if run % 2 else (False, True):
                prefix = os.path.join(args.dir, f"check{int(check)}", "ckpt")
                comm.Barrier()
                start = time.perf_counter()
                savers[check].save(prefix, write_state=False)
                slowest = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
                if run:
                    times[check].append(slowest)
        if comm.Get_rank() == 0:
            for check in (True, False):
                ts = times[check]
                print(
                    f"fsync={fsync} check_replicas={check}: median {statistics.median(ts) * 1e3:.0f} ms "
                    f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in ts)})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
