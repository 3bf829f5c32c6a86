"""One benchmark measurement, on every rank of ``mpiexec -n N python bench.py ...``.

Prints one JSON object (rank 0) with medians over ``--repeat`` runs after a warm-up.
``run.py`` launches this for each workload and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import shardsave as ss
from shardsave.plan import make_save_plan
from shardsave.save import protocol as save_protocol

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def rows_of(n: int, rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def transformer_like(gib: float, rank: int, size: int):
    """A few large float32 matrices (row-sharded) and many small vectors (replicated)."""
    n_small, small = 1000, 4096
    big_bytes = gib * 2**30 - n_small * small * 4
    side = 4096
    n_big = max(1, int(big_bytes // (side * side * 4)))
    out = []
    for i in range(n_big):
        r0, nr = rows_of(side, rank, size)
        arr = np.random.default_rng(i).standard_normal((nr, side), dtype=np.float32)
        out.append(
            ss.Variable(
                f"layer{i:02d}/kernel", arr, global_shape=(side, side), offset=(r0, 0), register=False
            )
        )
    for i in range(n_small):
        out.append(
            ss.Variable(f"layer{i % 50:02d}/norm{i:04d}", np.full(small, i, np.float32), register=False)
        )
    return out


def many_small(count: int = 20000, nbytes: int = 1024):
    return [
        ss.Variable(f"var{i:05d}", np.full(nbytes // 4, i, np.float32), register=False) for i in range(count)
    ]


def timed(fn) -> float:
    # start every measurement with no dirty pages, so that no writer pays for the
    # writeback of what the one before it left (throttling would move the cost around)
    os.sync()
    COMM.Barrier()
    t = time.perf_counter()
    fn()
    COMM.Barrier()
    return time.perf_counter() - t


def raw_write(path: str, arrays, fsync: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with open(path, "wb", buffering=0) as f:
        for a in arrays:
            f.write(memoryview(a).cast("B"))
        if fsync:
            os.fsync(f.fileno())


def raw_read(path: str, outs) -> None:
    with open(path, "rb", buffering=0) as f:
        for o in outs:
            view = memoryview(o).cast("B")
            if f.readinto(view) < len(view):
                f.seek(0)
                f.readinto(view)


CHECK_CHUNK = 1 << 20
_check_pool: list = []


def raw_read_checked(path: str, outs) -> None:
    """Raw plus the same check: the bytes read with ``preadv`` into the preallocated buffers
    and CRC32C'd, 1 MiB at a time (in cache), by as many threads as a restore uses per rank
    (``io_threads.workers()``): the limit of a checked read, as raw plus fsync is the limit
    of a durable write."""
    from concurrent.futures import ThreadPoolExecutor

    from shardsave.format.crc import crc32c
    from shardsave.storage.threads import workers

    if not _check_pool:
        _check_pool.append(ThreadPoolExecutor(workers()))
    chunks, offset = [], 0
    for o in outs:
        view = memoryview(o).cast("B")
        chunks += [(offset + i, view[i : i + CHECK_CHUNK]) for i in range(0, len(view), CHECK_CHUNK)]
        offset += len(view)
    fd = os.open(path, os.O_RDONLY)
    try:
        count, size = workers(), os.fstat(fd).st_size

        def work(i: int) -> int:
            crc = 0
            for at, chunk in chunks[i::count]:
                done = 0
                while done < len(chunk):
                    # a rank reads more than it wrote (replicated vectors are written
                    # once): past the end of its file it reads from the start again
                    pos = (at + done) % size
                    n = os.preadv(fd, [chunk[done : done + size - pos]], pos)
                    if n == 0:
                        raise EOFError(path)
                    done += n
                crc ^= crc32c(chunk)
            return crc

        for f in [_check_pool[0].submit(work, i) for i in range(count)]:
            f.result()
    finally:
        os.close(fd)


def drop_caches() -> None:
    """Empty the page cache (as root; every rank syncs, one writes)."""
    os.sync()
    COMM.Barrier()
    if RANK == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    COMM.Barrier()


def median(xs):
    return statistics.median(xs)


def bench_save_restore(args) -> dict:
    variables = transformer_like(args.gib, RANK, SIZE) if args.workload == "a" else many_small()
    directory = args.dir
    if RANK == 0:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    COMM.Barrier()
    saver = ss.Saver(variables, max_to_keep=1, comm=COMM, fsync=args.fsync)
    # what this rank writes and what it reads back, for raw
    arrays, metas = save_protocol.check_arrays(saver.comm, saver._layout, "bench")
    plan = make_save_plan(COMM.allgather(metas))
    mine = [arrays[a.index] for a in plan.writes[RANK]]
    needed = [np.empty_like(v.value) for v in variables]
    prefix = os.path.join(directory, "ckpt")
    raw_path = os.path.join(directory, f"raw-{RANK}")

    def ss_save():
        saver.save(prefix)

    def ss_restore():
        saver.restore(prefix)

    new_arrays = ss.Saver(variables, comm=COMM, restore_in_place=False)
    direct = ss.Saver(variables, comm=COMM, restore_in_place="direct")

    def ss_restore_direct():
        direct.restore(prefix)

    def ss_restore_new():
        new_arrays.restore(prefix)

    def ss_nonblocking():
        saver.save(prefix, blocking=False)

    # the reference for a non-blocking save: a plain copy of this rank's arrays
    local = [v.value for v in variables]
    staging = [np.empty_like(a) for a in local]

    def copy_only():
        for dst, src in zip(staging, local, strict=True):
            np.copyto(dst, src)

    def raw_read_fresh():
        raw_read(raw_path, [np.empty_like(a) for a in needed])

    runs = {
        k: []
        for k in (
            "raw_write",
            "ss_save",
            "raw_read",
            "ss_restore",
            "copy",
            "nonblocking_call",
            "raw_read_fresh",
            "ss_restore_new",
            "raw_read_checked",
            "ss_restore_direct",
        )
    }
    for i in range(args.repeat + 1):
        # each read follows its own write, so both read a file of the same age: a file
        # read right after it was written and fsynced reads slower here (page cache state)
        rw = timed(lambda: raw_write(raw_path, mine, args.fsync))
        rr = timed(lambda: raw_read(raw_path, needed))
        sw = timed(ss_save)
        sr = timed(ss_restore)
        cp = timed(copy_only)
        nb = timed(ss_nonblocking)
        saver.wait_until_finished()
        rf = timed(raw_read_fresh)
        sn = timed(ss_restore_new)
        rc = timed(lambda: raw_read_checked(raw_path, needed))
        sd = timed(ss_restore_direct)
        if i:  # the first round is the warm-up
            for k, v in zip(runs, (rw, sw, rr, sr, cp, nb, rf, sn, rc, sd), strict=True):
                runs[k].append(v)
    written = COMM.allreduce(sum(a.nbytes for a in mine))
    read = COMM.allreduce(sum(a.nbytes for a in needed))
    out = {k: median(v) for k, v in runs.items()}
    out.update(
        bytes_written=written,
        bytes_read=read,
        ranks=SIZE,
        fsync=args.fsync,
        save_ratio=out["raw_write"] / out["ss_save"],
        restore_ratio=out["raw_read"] / out["ss_restore"],
        restore_new_ratio_fresh=out["raw_read_fresh"] / out["ss_restore_new"],
        nonblocking_vs_copy=out["nonblocking_call"] / out["copy"],
        restore_vs_checked=out["raw_read_checked"] / out["ss_restore"],
        direct_vs_checked=out["raw_read_checked"] / out["ss_restore_direct"],
        direct_bytes_read=COMM.allreduce(direct.last_restore_stats.bytes_read),
        direct_bytes_needed=COMM.allreduce(direct.last_restore_stats.bytes_needed),
        atomic_bytes_read=COMM.allreduce(
            saver.last_restore_stats.bytes_read + saver.last_restore_stats.bytes_reread
        ),
    )
    if args.workload == "a" and args.cold:
        out.update(cold_restores(saver, new_arrays, direct, prefix, raw_path, needed, args.cold))
    return out


def cold_restores(saver, new_arrays, direct, prefix, raw_path, needed, repeat: int) -> dict:
    """Each of the three restore modes, and raw plus check, from an empty page cache."""
    modes = {
        "cold_raw_read_checked": lambda: raw_read_checked(raw_path, needed),
        "cold_raw_read": lambda: raw_read(raw_path, needed),
        "cold_ss_restore": lambda: saver.restore(prefix),
        "cold_ss_restore_direct": lambda: direct.restore(prefix),
        "cold_ss_restore_new": lambda: new_arrays.restore(prefix),
    }
    runs = {k: [] for k in modes}
    for _ in range(repeat):  # alternated, so that the machine's drift hits every mode alike
        for k, fn in modes.items():
            drop_caches()
            runs[k].append(timed(fn))
    out = {k: median(v) for k, v in runs.items()}
    out.update(
        cold_direct_vs_checked=out["cold_raw_read_checked"] / out["cold_ss_restore_direct"],
        cold_atomic_vs_checked=out["cold_raw_read_checked"] / out["cold_ss_restore"],
    )
    return out


def bench_first(args) -> dict:
    """Workload (b)'s first save and restore: a new Saver's (its layout, metadata and plan
    made from scratch) against a reused one's, alternated; a small Saver runs first so that
    the code is imported and warm, as it is in a job that saves for the second time."""
    directory = args.dir
    if RANK == 0:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    COMM.Barrier()
    warm = ss.Saver(
        [ss.Variable(f"w{i}", np.ones(256, np.float32), register=False) for i in range(100)], comm=COMM
    )
    warm.restore(warm.save(os.path.join(directory, "warm")))
    variables = many_small()
    prefix = os.path.join(directory, "ckpt")
    runs = {"fresh_save": [], "fresh_restore": [], "reused_save": [], "reused_restore": []}
    for i in range(args.repeat + 1):
        saver = None

        def new_saver_save():
            nonlocal saver
            saver = ss.Saver(variables, max_to_keep=1, comm=COMM, fsync=args.fsync)
            saver.save(prefix)

        first = timed(new_saver_save)
        made = saver
        times = (
            first,
            timed(lambda made=made: made.restore(prefix)),
            timed(lambda made=made: made.save(prefix)),
            timed(lambda made=made: made.restore(prefix)),
        )
        if i:
            for k, v in zip(runs, times, strict=True):
                runs[k].append(v)
    out = {k: median(v) for k, v in runs.items()}
    out.update(
        fresh_total=out["fresh_save"] + out["fresh_restore"],
        reused_total=out["reused_save"] + out["reused_restore"],
        variables=len(variables),
    )
    return out


def bench_memory(args) -> dict:
    """Peak RSS above the variables for a blocking save, and above the targets for a restore."""
    directory = args.dir
    variables = transformer_like(args.gib, 0, 1)
    state = sum(v.value.nbytes for v in variables)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ss.Saver(variables, comm=MPI.COMM_SELF, fsync=args.fsync).save(os.path.join(directory, "mem"))
    save_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"state_bytes": state, "save_extra_bytes": save_peak}


def bench_restore_memory(args) -> dict:
    """Peak RSS of a restore above the arrays it fills: into variables that hold arrays
    already (in place) or declared by shape only (new arrays); with ``-columns``, the
    matrices (saved whole) restored as two column halves each."""
    in_place = args.workload in ("restore-memory-in-place", "restore-memory-columns")
    columns = args.workload.startswith("restore-memory-columns")
    prefix = os.path.join(args.dir, "mem")

    def part(name, shape, **where):
        if in_place:
            return ss.Variable(name, np.ones(shape, np.float32), register=False, **where)
        return ss.Variable(name, dtype=np.float32, shape=shape, register=False, **where)

    shapes = ss.list_variables(prefix)
    variables = {}
    for name, shape in shapes:
        if columns and len(shape) == 2:
            half = shape[1] // 2
            variables[name] = [
                part(name, (shape[0], n), global_shape=shape, offset=(0, c))
                for c, n in ((0, half), (half, shape[1] - half))
            ]
        else:
            variables[name] = part(name, shape)
    targets = sum(int(np.prod(s)) * 4 for _, s in shapes)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ss.Saver(variables, comm=MPI.COMM_SELF).restore(prefix)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    extra = peak if in_place else peak - targets  # in place, the arrays were there before the restore began
    key = {
        "restore-memory": "restore_extra_bytes",
        "restore-memory-in-place": "in_place_restore_extra_bytes",
        "restore-memory-columns": "columns_in_place_extra_bytes",
        "restore-memory-columns-new": "columns_new_arrays_extra_bytes",
    }[args.workload]
    out = {key: extra}
    if args.workload == "restore-memory":
        out.update(target_bytes=targets, restore_peak_bytes=peak)
    return out


def bench_restart_save(args) -> dict:
    """The checkpoint and the raw file that ``bench_restart`` reads."""
    variables = transformer_like(args.gib, 0, 1)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    ss.Saver(variables, comm=MPI.COMM_SELF, fsync=args.fsync).save(os.path.join(args.dir, "ckpt"))
    raw_write(os.path.join(args.dir, "raw"), [v.value for v in variables], fsync=bool(args.fsync))
    return {"state_bytes": sum(v.value.nbytes for v in variables)}


def bench_restart(args) -> dict:
    """A job restarting: a new process initializes its variables, then restores once.

    The memory of a restore into new arrays then has to come from the system, as it does
    at a real restart (the bench loop of (a) reuses memory it has just freed). Raw reads
    the same bytes into the variables' arrays afterwards."""
    variables = transformer_like(args.gib, 0, 1)
    time.sleep(5)  # let the machine settle after initializing a GiB
    saver = ss.Saver(variables, comm=MPI.COMM_SELF, restore_in_place=bool(args.in_place))
    restore = timed(lambda: saver.restore(os.path.join(args.dir, "ckpt")))
    raw = timed(lambda: raw_read(os.path.join(args.dir, "raw"), [v.value for v in variables]))
    return {
        "ss_restore": restore,
        "raw_read": raw,
        "in_place": args.in_place,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "state_bytes": sum(v.value.nbytes for v in variables),
    }


def bench_reshard_save(args) -> dict:
    variables = transformer_like(args.gib, RANK, SIZE)
    if RANK == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
    COMM.Barrier()
    ss.Saver(variables, comm=COMM, fsync=args.fsync).save(os.path.join(args.dir, "ckpt"))
    return {"saved_by": SIZE}


def bench_reshard_restore(args) -> dict:
    """Restore (c) on this many ranks: into variables that hold arrays (in place, against
    raw into preallocated buffers) and into variables declared by shape only (new arrays,
    against raw into fresh buffers)."""
    prefix = os.path.join(args.dir, "ckpt")
    reader_shapes = dict(ss.list_variables(prefix)) if RANK == 0 else None
    shapes = COMM.bcast(reader_shapes)

    def my_variables(holding: bool):
        out = []
        for name, shape in sorted(shapes.items()):
            r0, nr = rows_of(shape[0], RANK, SIZE) if len(shape) == 2 else (0, shape[0])
            mine = (nr, *shape[1:])
            value = np.ones(mine, np.float32) if holding else None
            out.append(
                ss.Variable(
                    name,
                    value,
                    dtype=np.float32,
                    shape=mine,
                    global_shape=shape,
                    offset=(r0, *[0] * (len(shape) - 1)),
                    register=False,
                )
            )
        return out

    saver = ss.Saver(my_variables(holding=True), comm=COMM)
    direct = ss.Saver(my_variables(holding=True), comm=COMM, restore_in_place="direct")
    new_arrays = ss.Saver(my_variables(holding=False), comm=COMM)
    needed = [np.empty(v.shape, np.float32) for v in saver._layout.variables]
    raw_path = os.path.join(args.dir, f"raw-{RANK}")
    raw_write(raw_path, needed, fsync=False)
    keys = (
        "ss_restore",
        "raw_read",
        "ss_restore_new",
        "raw_read_fresh",
        "ss_restore_direct",
        "raw_read_checked",
    )
    runs = {k: [] for k in keys}
    for i in range(args.repeat + 1):
        t = timed(lambda: saver.restore(prefix))
        r = timed(lambda: raw_read(raw_path, needed))
        n = timed(lambda: new_arrays.restore(prefix))
        f = timed(lambda: raw_read(raw_path, [np.empty_like(a) for a in needed]))
        d = timed(lambda: direct.restore(prefix))
        c = timed(lambda: raw_read_checked(raw_path, needed))
        if i:
            for k, v in zip(runs, (t, r, n, f, d, c), strict=True):
                runs[k].append(v)
    stats, new_stats = saver.last_restore_stats, new_arrays.last_restore_stats
    direct_stats = direct.last_restore_stats
    total_read = COMM.allreduce(stats.bytes_read)
    total_reread = COMM.allreduce(stats.bytes_reread)
    total_new = COMM.allreduce(new_stats.bytes_read)
    total_needed = COMM.allreduce(sum(a.nbytes for a in needed))
    out = {k: median(v) for k, v in runs.items()}
    out.update(
        ranks=SIZE,
        bytes_read=total_read,
        bytes_reread=total_reread,
        bytes_needed=total_needed,
        read_amplification=total_read / total_needed,
        read_amplification_new=total_new / total_needed,
        read_amplification_direct=COMM.allreduce(direct_stats.bytes_read + direct_stats.bytes_reread)
        / total_needed,
        read_amplification_atomic=(total_read + total_reread) / total_needed,
        direct_vs_checked=out["raw_read_checked"] / out["ss_restore_direct"],
        restore_vs_checked=out["raw_read_checked"] / out["ss_restore"],
        restore_ratio=out["raw_read"] / out["ss_restore"],
        restore_new_ratio_fresh=out["raw_read_fresh"] / out["ss_restore_new"],
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--workload",
        required=True,
        choices=[
            "a",
            "b",
            "first",
            "memory",
            "restore-memory",
            "restore-memory-in-place",
            "restore-memory-columns",
            "restore-memory-columns-new",
            "restart-save",
            "restart",
            "reshard-save",
            "reshard-restore",
        ],
    )
    p.add_argument("--dir", required=True)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--fsync", type=int, default=1)
    p.add_argument("--in-place", type=int, default=1, help="restart: Saver(restore_in_place=...)")
    p.add_argument(
        "--cold", type=int, default=0, help="(a): also N restores per mode from an empty page cache"
    )
    args = p.parse_args()
    fn = {
        "a": bench_save_restore,
        "b": bench_save_restore,
        "first": bench_first,
        "memory": bench_memory,
        "restore-memory": bench_restore_memory,
        "restore-memory-in-place": bench_restore_memory,
        "restore-memory-columns": bench_restore_memory,
        "restore-memory-columns-new": bench_restore_memory,
        "restart-save": bench_restart_save,
        "restart": bench_restart,
        "reshard-save": bench_reshard_save,
        "reshard-restore": bench_reshard_restore,
    }[args.workload]
    result = fn(args)
    if RANK == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
