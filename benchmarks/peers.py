"""What the peer benchmarks (dcp_bench.py, orbax_bench.py) share: the arrays of workloads
(a) and (b) and the raw baseline. Plain numpy, so it runs in .venv-peers without shardsave.
"""

from __future__ import annotations

import os

import numpy as np


def workload_arrays(workload: str, gib: float) -> list[np.ndarray]:
    """(a): a few float32 4096x4096 matrices and 1000 vectors of 4096, about ``gib`` GiB
    in all; (b): 20,000 arrays of 1 KiB. The same arrays bench.py gives shardsave."""
    if workload == "a":
        side, n_small, small = 4096, 1000, 4096
        n_big = max(1, int((gib * 2**30 - n_small * small * 4) // (side * side * 4)))
        arrays = [np.random.default_rng(i).standard_normal((side, side), dtype=np.float32) for i in range(n_big)]
        return arrays + [np.full(small, i, np.float32) for i in range(n_small)]
    return [np.full(256, i, np.float32) for i in range(20000)]


def raw_write(path: str, arrays) -> None:
    """The arrays' bytes with plain writes into one file, fsynced (both peers fsync)."""
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb", buffering=0) as f:
        for a in arrays:
            f.write(memoryview(a).cast("B"))
        os.fsync(f.fileno())


def raw_read(path: str, outs) -> None:
    with open(path, "rb", buffering=0) as f:
        for o in outs:
            f.readinto(memoryview(o).cast("B"))
