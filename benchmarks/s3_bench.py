"""Workload (d): save and restore against a local S3 server (moto), counting requests and
bytes. Run under ``mpiexec -n N``: rank 0 starts the server and a counting proxy in front
of it, every rank saves and restores its part of (a) through the proxy.

The speed is the local server's (moto in Python), so it is reported, not targeted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=0.25)
    args = p.parse_args()
    from mpi4py import MPI
    from s3server import FaultProxy, S3Server

    import shardsave as ss

    sys.path.insert(0, HERE)
    from bench import transformer_like

    comm = MPI.COMM_WORLD
    server = proxy = None
    if comm.rank == 0:
        server = S3Server()
        proxy = FaultProxy(server.endpoint)
        setup = (server.options(endpoint=proxy.endpoint), server.bucket)
    else:
        setup = None
    options, bucket = comm.bcast(setup)
    out = None
    try:
        variables = transformer_like(args.gib, comm.rank, comm.size)
        saver = ss.Saver(variables, comm=comm, storage_options=options)
        url = f"s3://{bucket}/bench/model"

        def measured(fn):
            comm.Barrier()
            before = (proxy.requests, proxy.body_bytes_in, proxy.body_bytes_out) if proxy else None
            t = time.perf_counter()
            fn()
            comm.Barrier()
            seconds = time.perf_counter() - t
            if proxy is None:
                return seconds, None
            after = (proxy.requests, proxy.body_bytes_in, proxy.body_bytes_out)
            return seconds, [b - a for a, b in zip(before, after, strict=True)]

        save_s, save_counts = measured(lambda: saver.save(url))
        restore_s, restore_counts = measured(lambda: saver.restore(url))
        stats = saver.last_restore_stats
        nbytes = comm.allreduce(sum(v.value.nbytes for v in variables))
        read = comm.allreduce(stats.bytes_read)
        gets = comm.allreduce(stats.requests)
        if comm.rank == 0:
            out = {
                "ranks": comm.size,
                "variables": len(variables),
                "bytes": nbytes,
                "save_s": save_s,
                "save_requests": save_counts[0],
                "save_bytes_sent": save_counts[1],
                "restore_s": restore_s,
                "restore_requests": restore_counts[0],
                "restore_bytes_received": restore_counts[2],
                "restore_bytes_read": read,
                "restore_ranged_gets": gets,
                "save_MBps": nbytes / save_s / 1e6,
                "restore_MBps": nbytes / restore_s / 1e6,
            }
    finally:
        comm.Barrier()
        if proxy is not None:
            proxy.stop()
            server.stop()
    if out is not None:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
