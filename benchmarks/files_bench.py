"""Durable saves with ``Saver(files_per_node=k)`` against one file per rank: 8 ranks on 2
simulated nodes, launched with MPICH's MPMD syntax (as run.py's ``mpi_nodes`` does):

    mpiexec -n 4 -env SHARDSAVE_NODE_ID a python -m mpi4py benchmarks/files_bench.py --dir D : \\
            -n 4 -env SHARDSAVE_NODE_ID b python -m mpi4py benchmarks/files_bench.py --dir D

Workload (a) (bench.transformer_like, ~1 GiB over the 8 ranks), saved with fsync to ``D``
(local disk, not /dev/shm). Per layout (one file per rank; files_per_node 1, 2 and 4, where
4 is a file per rank again, through the gathering code): the time of a save (the slowest
rank, bench.timed: every measurement starts with no dirty pages) and its data files' sizes;
the layouts take turns, ``--repeat`` rounds after a warm-up round, and the medians are
printed as JSON (rank 0). Raw: each rank writes its arrays into one file of its own and
fsyncs, for the machine's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import COMM, median, raw_write, timed, transformer_like  # noqa: E402

import shardsave as ss  # noqa: E402

LAYOUTS = {"per_rank": None, "per_node_1": 1, "per_node_2": 2, "per_node_4": 4}


def slowest(fn) -> float:
    from mpi4py import MPI

    return COMM.allreduce(timed(fn), op=MPI.MAX)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", required=True, help="scratch directory on local disk")
    args = p.parse_args()
    rank = COMM.rank
    variables = transformer_like(args.gib, rank, COMM.size)
    mine = [v.value for v in variables if v.shape != v.global_shape or rank == 0]
    node = os.environ.get("SHARDSAVE_NODE_ID", "a")
    out: dict = {
        "ranks": COMM.size,
        "nodes": len(set(COMM.allgather(node))),
        "gib": COMM.allreduce(sum(a.nbytes for a in mine)) / 2**30,
        "repeat": args.repeat,
    }
    os.makedirs(args.dir, exist_ok=True)
    savers = {
        name: ss.Saver(variables, max_to_keep=1, comm=COMM, fsync=True, files_per_node=k, timeout=600)
        for name, k in LAYOUTS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in [*LAYOUTS, "raw"]}
    raw_path = os.path.join(args.dir, f"raw-{rank}")
    try:
        for round_ in range(args.repeat + 1):  # round 0 warms up
            for name, saver in savers.items():
                t = slowest(lambda s=saver, n=name: s.save(os.path.join(args.dir, n, "ckpt")))
                if round_:
                    times[name].append(t)
            t = slowest(lambda: raw_write(raw_path, mine, fsync=True))
            if round_:
                times["raw"].append(t)
        out["save_s"] = {name: median(ts) for name, ts in times.items()}
        out["runs_s"] = times
        if rank == 0:
            out["data_files"] = {
                name: sorted(
                    os.path.getsize(os.path.join(args.dir, name, f))
                    for f in os.listdir(os.path.join(args.dir, name))
                    if ".data-" in f
                )
                for name in LAYOUTS
            }
            out["data_file_counts"] = {name: len(sizes) for name, sizes in out["data_files"].items()}
            out["gib_per_s"] = {name: out["gib"] / t for name, t in out["save_s"].items()}
    finally:
        for saver in savers.values():
            saver.close()
        COMM.Barrier()
        if rank == 0:
            shutil.rmtree(args.dir, ignore_errors=True)
    if rank == 0:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
