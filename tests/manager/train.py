"""A training loop on ss.CheckpointManager, run under mpiexec by tests/test_manager.py.

    mpiexec -n N python -m mpi4py tests/manager/train.py --dir D --steps T [--kill-at K]
        [--expect-start S] [--max-to-keep 2] [--interval 3]

Every rank holds its rows of ``w`` (the global value a pure function of the step, so any
process can check it) and a replicated ``step``. ``--kill-at K``: the last rank sends
itself SIGTERM in the middle of step K (after should_save), as Slurm would; every rank
must then save step K + 1 and leave the loop. Rank 0 prints one line
``RESULT {json}`` with what every rank saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

import numpy as np
from mpi4py import MPI

import shardsave as ss

ROWS, COLS = 10, 6


def value(step: int) -> np.ndarray:
    return np.random.default_rng([3, step]).standard_normal((ROWS, COLS))


def rows(rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(ROWS, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--max-to-keep", type=int, default=2)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--checks", action="store_true", help="then ranks disagree: every rank must raise")
    p.add_argument("--exit-pending", action="store_true", help="exit with the last save still pending")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    lo, hi = rows(rank, size)
    w = ss.Variable("w", np.zeros((hi - lo, COLS)), global_shape=(ROWS, COLS), offset=(lo, 0), register=False)
    step_var = ss.Variable("step", np.int64(-1), register=False)

    chained = []  # the application's own handler, which the manager's must chain to
    signal.signal(signal.SIGTERM, lambda signum, frame: chained.append(signum))
    mine = signal.getsignal(signal.SIGTERM)

    mgr = ss.CheckpointManager(
        args.dir, [w, step_var], max_to_keep=args.max_to_keep, save_interval_steps=args.interval, timeout=60
    )
    start = mgr.restore_or_initialize()
    restored_ok = None
    if start is not None:  # every rank checks its own rows of what it restored
        restored_ok = bool(np.array_equal(w.value, value(start)[lo:hi]) and int(step_var.value) == start)
        meta = mgr.metadata(start)
        restored_ok = restored_ok and meta == {"launch_size": meta["launch_size"], "step": start}
    saved, handles, preempted_at = [], [], None
    for step in range((start + 1) if start is not None else 0, args.steps):
        w.assign(value(step)[lo:hi])  # "training"
        step_var.assign(np.int64(step))
        if mgr.should_save(step):
            h = mgr.save(
                step,
                metrics={"loss": float(np.float32(1.0 / (step + 1)))},
                metadata={"step": step, "launch_size": size},
            )
            handles.append(type(h).__name__)
            saved.append(step)
        if args.kill_at == step and rank == size - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if mgr.reached_preemption(step):
            mgr.wait_until_finished()
            preempted_at = step
            break
    errors = []
    if args.checks:  # one rank's bad argument, or a step that differs: every rank raises, none hangs
        for kwargs in ({"metadata": {"x": object()} if rank == size - 1 else {"x": 1}}, {}):
            try:
                mgr.save(1000 + (rank if not kwargs else 0), blocking=True, **kwargs)
            except ss.InvalidArgumentError as exc:
                errors.append(str(exc))
    report = {
        "errors": errors,
        "rank": rank,
        "start": start,
        "restored_ok": restored_ok,
        "saved": saved,
        "handles": sorted(set(handles)),
        "preempted_at": preempted_at,
        "chained": chained,
    }
    if args.exit_pending:  # the interpreter's exit must still finish the last save
        report["pending"] = mgr._pending.step if mgr._pending else None
    else:
        mgr.wait_until_finished()
        report.update(all_steps=mgr.all_steps(), latest=mgr.latest_step())
        mgr.close()
        report["handler_restored"] = signal.getsignal(signal.SIGTERM) is mine
    everyone = comm.gather(report)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)


if __name__ == "__main__":
    main()
