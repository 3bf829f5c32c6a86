"""What the peer benchmarks (dcp_bench.py, orbax_bench.py) share: the arrays of workloads
(a) and (b) and the raw baseline. Plain numpy, so it runs in .venv-peers without shardsave.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np


def arguments() -> argparse.ArgumentParser:
    """The options both peer scripts take (each may add its own)."""
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workload", choices=["a", "b"], default="a")
    return p


def timed_raw(directory: str, arrays, outs) -> tuple[float, float]:
    """Empty ``directory``, then time raw's write of ``arrays`` and its read into ``outs``."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.sync()
    path = os.path.join(directory, "raw")
    t = time.perf_counter()
    raw_write(path, arrays)
    written = time.perf_counter() - t
    t = time.perf_counter()
    raw_read(path, outs)
    return written, time.perf_counter() - t


def workload_arrays(workload: str, gib: float) -> list[np.ndarray]:
    """(a): a few float32 4096x4096 matrices and 1000 vectors of 4096, about ``gib`` GiB
    in all; (b): 20,000 arrays of 1 KiB. The same arrays bench.py gives shardsave."""
    if workload == "a":
        side, n_small, small = 4096, 1000, 4096
        n_big = max(1, int((gib * 2**30 - n_small * small * 4) // (side * side * 4)))
        arrays = [
            np.random.default_rng(i).standard_normal((side, side), dtype=np.float32) for i in range(n_big)
        ]
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
