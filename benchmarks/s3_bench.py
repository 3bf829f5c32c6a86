"""Workload (d): save and restore against a local S3 server (moto), counting requests.

Requests go through a counting proxy in front of the server; the speed is the local
server's (moto in Python), so it is reported, not targeted.
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

    server = S3Server()
    proxy = FaultProxy(server.endpoint)
    try:
        options = server.options(endpoint=proxy.endpoint)
        variables = transformer_like(args.gib, 0, 1)
        saver = ss.Saver(variables, comm=MPI.COMM_SELF, storage_options=options)
        url = f"s3://{server.bucket}/bench/model"
        before = proxy.requests
        t = time.perf_counter()
        saver.save(url)
        save_s = time.perf_counter() - t
        save_requests = proxy.requests - before
        before = proxy.requests
        t = time.perf_counter()
        saver.restore(url)
        restore_s = time.perf_counter() - t
        restore_requests = proxy.requests - before
        stats = saver.last_restore_stats
        nbytes = sum(v.value.nbytes for v in variables)
        out = {"variables": len(variables), "bytes": nbytes, "save_s": save_s, "save_requests": save_requests,
               "restore_s": restore_s, "restore_requests": restore_requests,
               "restore_bytes_read": stats.bytes_read, "restore_ranged_gets": stats.requests,
               "save_MBps": nbytes / save_s / 1e6, "restore_MBps": nbytes / restore_s / 1e6}
    finally:
        proxy.stop()
        server.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
