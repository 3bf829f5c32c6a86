"""The threads that read (and check) data files, shared by every restore.

File reads, CRC32C and numpy copies release the GIL, so a few threads keep a couple of
cores busy. ``run_on_workers`` gives each thread one scratch buffer for all its jobs,
which bounds the memory a pass over a large checkpoint needs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

READ_THREADS = 8


def wait_all(futures: Sequence[Future]) -> None:
    """Wait for every future, then raise the first one's error, if any.

    Returning at the first error would leave the others still reading into their
    buffers, and into whatever file reuses a descriptor the caller then closes.
    """
    for future in futures:
        future.exception()
    for future in futures:
        future.result()


MAX_WORKERS = 8
"""Threads of ``run_on_workers``: one per CPU up to this, which bounds the scratch memory
(one buffer per thread) on nodes with many cores."""


def workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, MAX_WORKERS)


def run_on_workers(
    jobs: Sequence[Callable[[memoryview], None]], scratch_bytes: int = 0, scratch: Sequence[memoryview] = ()
) -> None:
    """Run ``jobs`` on ``workers()`` I/O threads, each passing its own scratch buffer to its
    jobs (``scratch[i]``, or a new one of ``scratch_bytes``); after an error, the other
    threads start no new job, and the first error is raised once all have stopped.

    A job must not wait on ``io_pool`` itself (``storage.read_ranges`` of one range reads
    in the calling thread): with as many CPUs as MAX_WORKERS, every pool thread is a worker."""
    count = min(len(jobs), workers())
    failed = threading.Event()

    def work(i: int) -> None:
        buf = scratch[i] if scratch else memoryview(bytearray(scratch_bytes))
        try:
            for job in jobs[i::count]:
                if failed.is_set():
                    return
                job(buf)
        except BaseException:
            failed.set()
            raise

    wait_all([io_pool().submit(work, i) for i in range(count)])


_pool: ThreadPoolExecutor | None = None


def io_pool() -> ThreadPoolExecutor:
    """Threads shared by all reads."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shardsave-io")
    return _pool
