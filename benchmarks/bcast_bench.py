"""What broadcasting an index's bytes to every rank costs (restore step 1).

Run as ``mpiexec -n N python -m mpi4py benchmarks/bcast_bench.py --mib 560``: rank 0
broadcasts a buffer of that size (as ``Comm.bcast`` would: a pickled bytes object, and
as a raw buffer with ``Bcast``), every rank times it and reports its peak memory growth.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=560)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    size = args.mib << 20
    data = np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes() if comm.rank == 0 else None
    comm.Barrier()
    base = _hwm_mib()
    t = time.perf_counter()
    got = comm.bcast(data, root=0)
    comm.Barrier()
    pickled = time.perf_counter() - t
    assert len(got) == size
    del got
    buf = np.frombuffer(data, np.uint8).copy() if comm.rank == 0 else np.empty(size, np.uint8)
    comm.Barrier()
    t = time.perf_counter()
    comm.Bcast(buf, root=0)
    comm.Barrier()
    raw = time.perf_counter() - t
    rows = comm.gather(
        {
            "rank": comm.rank,
            "bcast_s": round(pickled, 3),
            "Bcast_s": round(raw, 3),
            "peak_growth_mib": round(_hwm_mib() - base),
        }
    )
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "mib": args.mib, "per_rank": rows}))


if __name__ == "__main__":
    main()
