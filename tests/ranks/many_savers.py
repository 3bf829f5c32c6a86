"""Make more Savers than MPI has communicators (MPICH: about 2045 at a time), dropping
each one or closing it, then save and restore with one more; prints ``rank N ok``.

Each Saver duplicates its communicator; without freeing the duplicate when the Saver is
closed or collected, the 2046th construction fails in MPI_Comm_dup.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
from mpi4py import MPI

import shardsave as ss

SAVERS = 2200

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--how", choices=["collect", "close", "with"], required=True)
args = p.parse_args()
rank = MPI.COMM_WORLD.rank
v = ss.Variable("w", np.arange(4.0) + rank, global_shape=(8,), offset=(4 * rank,))
for _ in range(SAVERS):
    if args.how == "collect":
        ss.Saver([v], timeout=60)
        if _ % 500 == 0:  # a Saver in a reference cycle is freed by the collector
            gc.collect()
    elif args.how == "close":
        ss.Saver([v], timeout=60).close()
    else:
        with ss.Saver([v], timeout=60):
            pass
with ss.Saver([v], timeout=60) as saver:
    saver.restore(saver.save(f"{args.dir}/ckpt"))
assert np.array_equal(v.value, np.arange(4.0) + rank)
print(f"rank {rank} ok", flush=True)
