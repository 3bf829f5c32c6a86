"""Run under mpiexec: a small model on many ranks (tests/test_scale_ranks.py).

80 float32 matrices 256 x 48 sharded by rows over the ranks and 20 replicated vectors of
1024 floats (3.8 MiB in 100 variables). Every value is a pure function of (variable,
element), so any number of ranks, and the test process, know what a restore must give.

``--phase save``: save ``DIR/model`` once, then restore it into zeroed arrays and check
every rank's bytes. ``--phase restore``: restore it on this number of ranks into
variables declared by shape only and check. Rank 0 prints ``ok <ranks> <seconds>``; a
rank whose bytes differ makes the job exit 1 after printing them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import shardsave as ss

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
MATRICES, ROWS, COLS = 80, 256, 48
VECTORS, VECTOR = 20, 1024


def element_values(key: int, start: int, count: int) -> np.ndarray:
    """Elements ``start .. start+count`` of variable ``key``: float32 in [1, 2) from a
    multiplicative hash of the element's index."""
    i = np.arange(start, start + count, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(key * 40503 + 1)) & np.uint64(0xFFFFFFFF)
    return ((h.astype(np.uint32) >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32)


def rows_of(rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(ROWS, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def global_values() -> dict[str, np.ndarray]:
    """The whole value of every variable."""
    out = {
        f"layer{k:02d}/kernel": element_values(k, 0, ROWS * COLS).reshape(ROWS, COLS) for k in range(MATRICES)
    }
    out.update({f"layer{k:02d}/norm": element_values(1000 + k, 0, VECTOR) for k in range(VECTORS)})
    return out


def local_values(rank: int, size: int) -> dict[str, np.ndarray]:
    """``rank``'s part: its rows of every matrix, every vector whole."""
    lo, hi = rows_of(rank, size)
    out = {
        f"layer{k:02d}/kernel": element_values(k, lo * COLS, (hi - lo) * COLS).reshape(hi - lo, COLS)
        for k in range(MATRICES)
    }
    out.update({f"layer{k:02d}/norm": element_values(1000 + k, 0, VECTOR) for k in range(VECTORS)})
    return out


def variables(values: dict[str, np.ndarray], by_shape: bool) -> list:
    lo, _ = rows_of(RANK, SIZE)
    out = []
    for name, arr in values.items():
        where = {"global_shape": (ROWS, COLS), "offset": (lo, 0)} if arr.ndim == 2 else {}
        if by_shape:
            out.append(ss.Variable(name, dtype=arr.dtype, shape=arr.shape, register=False, **where))
        else:
            out.append(ss.Variable(name, arr, register=False, **where))
    return out


def check(restored: list, want: dict[str, np.ndarray]) -> None:
    bad = [v.name for v in restored if v.value.tobytes() != want[v.name].tobytes()]
    everyone = COMM.gather(bad)
    wrong = {rank: names for rank, names in enumerate(everyone or []) if names}
    if RANK == 0 and wrong:
        print(f"not bit-exact on {SIZE} ranks: {wrong}", flush=True)
    if COMM.bcast(bool(wrong)):
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--phase", choices=("save", "restore"), required=True)
    args = p.parse_args()
    started = time.monotonic()
    prefix = os.path.join(args.dir, "model")
    want = local_values(RANK, SIZE)
    if args.phase == "save":
        ss.Saver(variables(want, by_shape=False), comm=COMM, timeout=120).save(prefix)
        targets = variables({name: np.zeros_like(arr) for name, arr in want.items()}, by_shape=False)
    else:
        targets = variables(want, by_shape=True)
    ss.Saver(targets, comm=COMM, timeout=120).restore(prefix)
    check(targets, want)
    if RANK == 0:
        print(f"ok {SIZE} {time.monotonic() - started:.1f}", flush=True)


if __name__ == "__main__":
    main()
