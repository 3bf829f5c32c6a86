"""Workload (d): save and restore against a local S3 server (moto), counting requests and
bytes. Run under ``mpiexec -n N``: rank 0 starts the server and a counting proxy in front
of it, every rank saves and restores its part of (a) through the proxy.

Requests are also given per GiB that crossed the proxy (S3 takes about 3,500 writes a
second per prefix, so at scale they, not bytes, can bound a save). Two more runs show the
part size at work: a second save with ``--part-mib`` as the ``upload_part_size`` storage
option, and (on one rank only) one file of ``--rule-gib`` GiB streamed through
``storage.Writer`` without and with its size as the hint, from which the part size rule
picks the part (storage/s3.py ``base_part_size``).

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
    p.add_argument("--part-mib", type=int, default=64, help="upload_part_size of a second save (0: none)")
    p.add_argument(
        "--rule-gib",
        type=float,
        default=1.0,
        help="GiB streamed without and with a size hint, on 1 rank (0: none)",
    )
    args = p.parse_args()
    from mpi4py import MPI
    from s3server import FaultProxy, S3Server

    import shardsave as ss
    from shardsave import storage
    from shardsave.storage import s3

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
        file_bytes = comm.gather(sum(v.value.nbytes for v in variables))  # about each rank's data file
        option = None
        if args.part_mib:
            part = args.part_mib << 20
            saver2 = ss.Saver(variables, comm=comm, storage_options={**options, "upload_part_size": part})
            option_s, option_counts = measured(lambda: saver2.save(f"s3://{bucket}/bench/parts"))
            if option_counts is not None:  # rank 0, which counts
                option = {
                    "upload_part_size": part,
                    "save_s": option_s,
                    "save_requests": option_counts[0],
                    "save_requests_per_GiB": per_gib(option_counts[0], option_counts[1]),
                }
        rule = None
        if args.rule_gib and comm.size == 1:
            size = int(args.rule_gib * 2**30)
            loc = storage.resolve(f"s3://{bucket}/bench/rule", options)
            rule = {"bytes": size}
            for key, hint in (("no_hint", None), ("hint", size)):
                seconds, counts = measured(lambda hint=hint: stream(loc, size, hint))
                rule[key] = {
                    "part_bytes": s3.base_part_size(hint),
                    "s": seconds,
                    "requests": counts[0],
                    "requests_per_GiB": per_gib(counts[0], counts[1]),
                }
            storage.remove([loc])
        if comm.rank == 0:
            out = {
                "ranks": comm.size,
                "variables": len(variables),
                "bytes": nbytes,
                "rank_bytes": file_bytes,
                "part_bytes": s3.base_part_size(None),  # the saves give no size hint (yet)
                "rule_part_bytes": [s3.base_part_size(b) for b in file_bytes],
                "save_s": save_s,
                "save_requests": save_counts[0],
                "save_bytes_sent": save_counts[1],
                "save_requests_per_GiB": per_gib(save_counts[0], save_counts[1]),
                "restore_s": restore_s,
                "restore_requests": restore_counts[0],
                "restore_bytes_received": restore_counts[2],
                "restore_requests_per_GiB": per_gib(restore_counts[0], restore_counts[2]),
                "restore_bytes_read": read,
                "restore_ranged_gets": gets,
                "save_MBps": nbytes / save_s / 1e6,
                "restore_MBps": nbytes / restore_s / 1e6,
                "part_option": option,
                "rule": rule,
            }
    finally:
        comm.Barrier()
        if proxy is not None:
            proxy.stop()
            server.stop()
    if out is not None:
        print(json.dumps(out))
    return 0


def per_gib(requests: int, nbytes: int) -> float:
    """Requests per GiB that crossed the proxy."""
    return requests / (nbytes / 2**30) if nbytes else 0.0


def stream(loc, size: int, size_hint: int | None) -> None:
    """Write ``size`` bytes to ``loc`` in 4 MiB writes, as a save streams a data file."""
    from shardsave import storage

    chunk = memoryview(bytes(range(256)) * (16 << 10))  # 4 MiB
    w = storage.Writer(loc, fsync=False, size_hint=size_hint)
    try:
        for start in range(0, size, len(chunk)):
            w.write(chunk[: min(len(chunk), size - start)])
        w.close()
    except BaseException:
        w.abort()
        raise


if __name__ == "__main__":
    sys.exit(main())
