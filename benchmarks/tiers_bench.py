"""The fast tier (multi-level checkpoints): 4 ranks on 2 simulated nodes, launched by
run.py with MPICH's MPMD syntax (``-env SHARDSAVE_NODE_ID a ... : -env ... b ...``).

Workload (a) over the 4 ranks. Per scheme (none, partner, xor with groups of 2 nodes):
the time training waits for a blocking fast-tier save (the slowest rank), the bytes each
rank sends for redundancy and the tier's bytes on disk; against raw (each rank writes its
arrays into one file in the fast tier's filesystem, no fsync) and the durable save (the
Saver to the local disk, fsync). Then the restart after one lost node: restored from the
fast tier (partner copies / XOR rebuild, every copy checked) against the same restore
from the durable tier on moto's S3 server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import numpy as np  # noqa: E402
from bench import COMM, median, raw_write, timed, transformer_like  # noqa: E402

import shardsave as ss  # noqa: E402

NODE = os.environ.get("SHARDSAVE_NODE_ID", "a")


def slowest(fn) -> float:
    return COMM.allreduce(timed(fn), op=_max())


def _max():
    from mpi4py import MPI

    return MPI.MAX


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", required=True, help="durable scratch directory (local disk)")
    p.add_argument("--shm", default="/dev/shm", help="where the fast tier goes (tmpfs)")
    args = p.parse_args()
    rank = COMM.rank
    variables = transformer_like(args.gib, rank, COMM.size)
    mine = [v.value for v in variables if v.shape != v.global_shape or rank == 0]
    fast_root = os.path.join(args.shm, f"shardsave-bench-tiers-{os.getppid()}")
    out: dict = {"ranks": COMM.size, "nodes": len(set(COMM.allgather(NODE)))}
    try:
        raw_dir = os.path.join(fast_root, "raw", NODE)
        os.makedirs(raw_dir, exist_ok=True)
        raw_path = os.path.join(raw_dir, f"raw-{rank}")
        timed(lambda: raw_write(raw_path, mine, fsync=False))  # warm-up
        out["raw_fast_s"] = median(
            [slowest(lambda: raw_write(raw_path, mine, fsync=False)) for _ in range(args.repeat)]
        )
        os.makedirs(args.dir, exist_ok=True)
        durable_raw = os.path.join(args.dir, f"raw-{rank}")
        out["raw_durable_fsync_s"] = median(
            [slowest(lambda: raw_write(durable_raw, mine, fsync=True)) for _ in range(args.repeat)]
        )
        os.unlink(durable_raw)
        os.unlink(raw_path)
        saver = ss.Saver(variables, max_to_keep=1, comm=COMM, fsync=True)
        saver.save(os.path.join(args.dir, "durable", "ckpt"))
        out["durable_save_s"] = median(
            [
                slowest(lambda: saver.save(os.path.join(args.dir, "durable", "ckpt")))
                for _ in range(args.repeat)
            ]
        )
        saver.close()
        out["schemes"] = {}
        for scheme in ("none", "partner", "xor"):
            out["schemes"][scheme] = one_scheme(args, variables, fast_root, scheme)
        out["restart"] = restart(args, variables, fast_root)
    finally:
        COMM.Barrier()
        if rank == 0:
            shutil.rmtree(fast_root, ignore_errors=True)
            shutil.rmtree(args.dir, ignore_errors=True)
    if rank == 0:
        out["partner_vs_raw"] = out["schemes"]["partner"]["save_s"] / out["raw_fast_s"]
        out["durable_vs_partner"] = out["durable_save_s"] / out["schemes"]["partner"]["save_s"]
        print(json.dumps(out))
    return 0


def one_scheme(args, variables, fast_root: str, scheme: str) -> dict:
    local = os.path.join(fast_root, scheme, "{node}")
    mgr = ss.CheckpointManager(
        os.path.join(args.dir, f"durable-{scheme}"),
        variables,
        local_directory=local,
        local_max_to_keep=1,
        redundancy=scheme,
        redundancy_group_size=2,
        comm=COMM,
    )
    mgr.save(0, blocking=True)  # warm-up
    times = [slowest(lambda s=s: mgr.save(s, blocking=True)) for s in range(1, args.repeat + 1)]
    protection = mgr._fast.tier.last_protection
    sent = COMM.gather(protection.bytes_sent)
    redundancy_s = COMM.allreduce(protection.seconds, op=_max())
    mgr.close()
    COMM.Barrier()
    on_disk = tree_bytes(os.path.join(fast_root, scheme)) if COMM.rank == 0 else None
    return {
        "save_s": median(times),
        "redundancy_s_last": redundancy_s,
        "bytes_sent_per_rank": sent,
        "tier_bytes": on_disk,
    }


def restart(args, variables, fast_root: str) -> dict:
    """One lost node (b): the restart from the fast tier against the durable S3 tier."""
    from s3server import S3Server

    out: dict = {}
    server = S3Server() if COMM.rank == 0 else None
    options, bucket = COMM.bcast((server.options(), server.bucket) if server else None)
    try:
        saver = ss.Saver(variables, max_to_keep=1, comm=COMM, storage_options=options)
        url = f"s3://{bucket}/bench/ckpt"
        saver.save(url)
        out["s3_restore_s"] = median([slowest(lambda: saver.restore(url)) for _ in range(args.repeat)])
        saver.close()
    finally:
        if server is not None:
            server.stop()
    for scheme in ("partner", "xor"):
        base = os.path.join(fast_root, scheme)
        keep = base + "-kept"
        if COMM.rank == 0:
            shutil.copytree(base, keep)
        times, rebuilds, bytes_read, sources = [], [], [], None
        for _ in range(args.repeat):
            COMM.Barrier()
            if COMM.rank == 0:
                shutil.rmtree(base)
                shutil.copytree(keep, base)
                shutil.rmtree(os.path.join(base, "b"))
            COMM.Barrier()
            mgr = ss.CheckpointManager(
                os.path.join(args.dir, f"durable-{scheme}"),
                variables,
                local_directory=os.path.join(base, "{node}"),
                redundancy=scheme,
                redundancy_group_size=2,
                comm=COMM,
            )
            t = slowest(mgr.restore_or_initialize)
            assert mgr.restored_from["tier"] == "fast", mgr.restored_from
            times.append(t)
            rebuilds.append(COMM.allreduce(mgr.restored_from["rebuild_seconds"], op=_max()))
            bytes_read.append(mgr.restored_from["bytes_read"])
            sources = sorted({f["source"] for f in mgr.restored_from["files"]})
            mgr.close()
        out[f"{scheme}_restore_s"] = median(times)
        out[f"{scheme}_rebuild_s"] = median(rebuilds)  # checks of partner copies, XOR rebuilds
        out[f"{scheme}_bytes_read_rank"] = COMM.gather(bytes_read[-1])
        out[f"{scheme}_sources"] = sources
        out[f"s3_vs_{scheme}"] = out["s3_restore_s"] / out[f"{scheme}_restore_s"]
    _check_values(variables)
    return out


def _check_values(variables) -> None:
    """What the restarts restored is what transformer_like made (its first matrices)."""
    kernels = [v for v in variables if v.name.endswith("/kernel")]
    for i, v in enumerate(kernels[:2]):
        expected = np.random.default_rng(i).standard_normal(v.shape, dtype=np.float32)
        assert np.array_equal(v.value, expected), v.name


if __name__ == "__main__":
    sys.exit(main())
