"""Many ranks: save and restore of a small model under ``mpiexec -n N`` (issue "Speed at
scale"), with the coordinator's time set apart from a non-coordinator rank's.

    mpiexec -n N python -m mpi4py benchmarks/ranks_bench.py --dir D --phase save
    mpiexec -n M python -m mpi4py benchmarks/ranks_bench.py --dir D --phase restore

The model: 80 float32 matrices 256 x 48 (48 KiB each) sharded by rows over the ranks and
20 replicated vectors of 1024 floats, 3.8 MiB in 100 variables. Every value is a pure
function of (variable, row, column, step), so each rank checks its own rows bit for bit
on whatever number of ranks restores them.

``--phase save``: a warm-up save, then ``--repeat`` saves (``global_step`` 1, 2, ...;
``max_to_keep=2``), then a warm-up restore and ``--repeat`` restores of the last save,
each into zeroed arrays, the last checked bit for bit on every rank. ``--phase
restore``: the same restores on another number of ranks, of the last checkpoint in
``--dir``. Rank 0 prints one JSON line (run.py's "ranks" row prints its "brief").

MPICH runs with its defaults (ch4, shared memory between the ranks of one machine, no
binding): 64 ranks on 2 cores are slow but not pathological (an MPI_Barrier ~20-30 ms).
``MPIR_CVAR_CH4_PROGRESS_THROTTLE=1`` with ``MPIR_CVAR_ENABLE_HEAVY_YIELD=1`` (MPICH's
own waits sleep instead of spinning) measured within the noise here, and ``--spin``
(an experiment: shardsave's own polling, ``_comm.SPIN``) at 2 ms made 64 ranks slower.

Timings are taken from the outside: the protocol's steps (save/protocol.py,
restore/protocol.py), the coordinator's own work (the directory's preparation, the
replica check, the index merge, the commit) and the waits (``_comm._poll``, in which
``agree`` polls, and MPI's blocking ``bcast``/``gather``/``allgather``) are wrapped in
this process by a timing decorator that adds up wall and CPU time (``time.process_time``,
every thread of the rank) per call. Per phase: the median over the timed runs of rank 0
(the coordinator) and, over ranks 1..N-1, the median and the largest of their medians.
On oversubscribed cores a rank's wall time includes the time it waited for a core;
its CPU time is its work (plus what its polling burns).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import shardsave as ss
from shardsave import _comm
from shardsave.restore import index as restore_index
from shardsave.restore import protocol as restore_protocol
from shardsave.save import commit as commit_protocol
from shardsave.save import planning as save_planning
from shardsave.save import protocol as save_protocol

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()

MATRICES, ROWS, COLS = 80, 256, 48
VECTORS, VECTOR = 20, 1024


# ------------------------------------------------------------------------ the model
def rows_of(rows: int, rank: int, size: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` that ``rank`` of ``size`` holds."""
    base, extra = divmod(rows, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def values(key: int, step: int, start: int, count: int) -> np.ndarray:
    """Elements ``start .. start+count`` of variable ``key`` at ``step``: float32 in [1, 2)
    from a multiplicative hash of the element's index."""
    i = np.arange(start, start + count, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(key * 40503 + step * 977 + 1)) & np.uint64(0xFFFFFFFF)
    return ((h.astype(np.uint32) >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32)


def expected(rank: int, size: int, step: int) -> dict[str, np.ndarray]:
    """This rank's part of every variable at ``step``."""
    lo, hi = rows_of(ROWS, rank, size)
    out = {
        f"layer{k:02d}/kernel": values(k, step, lo * COLS, (hi - lo) * COLS).reshape(hi - lo, COLS)
        for k in range(MATRICES)
    }
    out.update({f"layer{k:02d}/norm": values(1000 + k, step, 0, VECTOR) for k in range(VECTORS)})
    return out


def model(rank: int, size: int, step: int | None) -> list:
    """This rank's variables, holding the values of ``step`` (None: zeros)."""
    lo, _ = rows_of(ROWS, rank, size)
    out = []
    for name, want in expected(rank, size, 0 if step is None else step).items():
        arr = np.zeros_like(want) if step is None else want
        where = {"global_shape": (ROWS, COLS), "offset": (lo, 0)} if want.ndim == 2 else {}
        out.append(ss.Variable(name, arr, register=False, **where))
    return out


def mismatches(variables: list, step: int) -> list[str]:
    """The variables whose bytes differ from ``step``'s on this rank."""
    want = expected(RANK, SIZE, step)
    return [v.name for v in variables if v.value.tobytes() != want[v.name].tobytes()]


# ---------------------------------------------------------------- timing from outside
class Probe:
    """Total wall and CPU seconds and calls per name, of the functions it wraps."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:  # the library moved it: measure the rest
            return
        totals = self.totals.setdefault(name, [0.0, 0.0, 0])

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[0] += time.perf_counter() - w
                totals[1] += time.process_time() - c
                totals[2] += 1

        setattr(owner, attr, timed)

    def snapshot(self) -> dict[str, tuple[float, float, float]]:
        return {name: tuple(t) for name, t in self.totals.items()}


PHASES = {
    "save": [
        (ss.Saver, "save", "save (whole call)"),
        (save_protocol, "check_arrays", "1 check + agree"),
        (save_protocol, "plan", "2 plan"),
        (save_planning, "make_save_plan", "  [coord] make_save_plan"),
        (save_protocol, "prepare", "3 prepare"),
        (commit_protocol, "prepare", "  [coord] prepare dir + recover"),
        (save_protocol, "write", "4 write + agree"),
        (save_protocol, "write_data_file", "  write_data_file"),
        (save_protocol, "encode_rank_part", "  encode_rank_part"),
        (save_protocol, "commit", "5 gather + merge + commit"),
        (save_protocol, "checked_replicas", "  [coord] checked_replicas"),
        (save_protocol, "merge_index", "  [coord] merge_index"),
        (save_protocol, "finish", "  [coord] finish (commit, state, retention)"),
        (commit_protocol, "commit", "    [coord] commit"),
    ],
    "restore": [
        (ss.Saver, "restore", "restore (whole call)"),
        (restore_protocol, "read_index", "1 read index + agree + bcast"),
        (commit_protocol, "recover", "  [coord] recover"),
        (restore_index, "read_index_bytes", "  [coord] read P.index"),
        (restore_index, "parse_index_or_raise", "  parse_index"),
        (restore_protocol, "targets", "2 targets"),
        (restore_protocol, "load", "2 load (fresh arrays)"),
        (restore_protocol, "load_small", "2 load_small"),
        (restore_protocol.InPlaceLoad, "check", "2 in-place check"),
        (restore_protocol.InPlaceLoad, "fill", "3 in-place fill"),
    ],
    "waits": [
        (_comm, "_poll", "wait: agree's polling (_comm._poll)"),
        (_comm.Comm, "_coordinate", "agree as coordinator (incl. polling)"),
        (_comm.Comm, "_await_verdict", "agree as other rank (incl. polling)"),
        (_comm.Comm, "bcast", "wait: MPI bcast"),
        (_comm.Comm, "gather", "wait: MPI gather"),
        (_comm.Comm, "allgather", "wait: MPI allgather"),
    ],
}


def install(probe: Probe) -> None:
    for group in PHASES.values():
        for owner, attr, name in group:
            probe.wrap(owner, attr, name)


# ---------------------------------------------------------------------------- runs
def timed_runs(probe: Probe, call, runs: int, profile: cProfile.Profile | None) -> dict:
    """``call(i)`` ``runs`` times between barriers, the first one a warm-up: per run, this
    rank's start and end (monotonic, one clock for every process of the machine) and
    the time each probed name took in it."""
    starts, ends, phases = [], [], []
    for i in range(runs):
        COMM.Barrier()
        before = probe.snapshot()
        if profile is not None and i:
            profile.enable()
        start = time.monotonic()
        call(i)
        ends.append(time.monotonic())
        if profile is not None and i:
            profile.disable()
        starts.append(start)
        after = probe.snapshot()
        zero = (0.0, 0.0, 0)
        phases.append(
            {n: [a - b for a, b in zip(t, before.get(n, zero), strict=True)] for n, t in after.items()}
        )
    return {"starts": starts[1:], "ends": ends[1:], "phases": phases[1:], "first": phases[0]}


def summary(mine: dict) -> dict | None:
    """Rank 0: wall per run (first start to last end over the ranks), and per probed name
    the coordinator's and the other ranks' medians."""
    every = COMM.gather(mine)
    if RANK:
        return None
    runs = len(mine["starts"])
    wall = [max(r["ends"][i] for r in every) - min(r["starts"][i] for r in every) for i in range(runs)]

    def med(rank: dict, name: str, k: int) -> float:
        return statistics.median(p.get(name, (0.0, 0.0, 0))[k] for p in rank["phases"])

    names = [n for group in PHASES.values() for _, _, n in group]
    phases = {}
    for name in names:
        if not any(name in p for r in every for p in r["phases"]):
            continue
        others = every[1:] or every
        row = {"coord_wall": med(every[0], name, 0), "coord_cpu": med(every[0], name, 1)}
        row["calls"] = med(every[0], name, 2)
        for k, key in ((0, "wall"), (1, "cpu")):
            values_ = [med(r, name, k) for r in others]
            row[f"other_{key}"] = statistics.median(values_)
            row[f"other_max_{key}"] = max(values_)
        phases[name] = row
    first = {
        name: {
            "coord_wall": every[0]["first"][name][0],
            "coord_cpu": every[0]["first"][name][1],
            "other_cpu": statistics.median(
                r["first"].get(name, (0.0, 0.0, 0))[1] for r in every[1:] or every
            ),
        }
        for name in names
        if name in every[0]["first"]
    }
    return {"wall": statistics.median(wall), "walls": wall, "phases": phases, "warm_up": first}


SAVE_COORDINATOR_ONLY = (
    "  [coord] prepare dir + recover",
    "  [coord] checked_replicas",
    "  [coord] merge_index",
    "  [coord] finish (commit, state, retention)",
)
RESTORE_COORDINATOR_ONLY = ("  [coord] recover", "  [coord] read P.index")


def brief(out: dict) -> dict:
    """The figures run.py prints (seconds): wall per call, CPU of the coordinator and of
    the median other rank, the coordinator's own work, and the parts that grow."""
    b: dict = {}
    for call in ("save", "restore"):
        if call not in out:
            continue
        phases = out[call]["phases"]
        whole = phases[f"{call} (whole call)"]
        poll = phases["wait: agree's polling (_comm._poll)"]
        own = SAVE_COORDINATOR_ONLY if call == "save" else RESTORE_COORDINATOR_ONLY
        b[f"{call}_s"] = out[call]["wall"]
        b[f"{call}_coord_cpu"] = whole["coord_cpu"]
        b[f"{call}_other_cpu"] = whole["other_cpu"]
        b[f"{call}_coord_own_cpu"] = sum(phases[n]["coord_cpu"] for n in own if n in phases)
        b[f"{call}_coord_poll_cpu"] = poll["coord_cpu"]
        b[f"{call}_other_poll_cpu"] = poll["other_cpu"]
    if "save" in out:
        b["merge_cpu"] = out["save"]["phases"]["  [coord] merge_index"]["coord_cpu"]
        first = out["save"]["warm_up"]
        b["first_plan_cpu"] = first.get("  [coord] make_save_plan", {}).get("coord_cpu", 0.0)
        b["first_plan_other_cpu"] = first.get("2 plan", {}).get("other_cpu", 0.0)
    phases = out["restore"]["phases"]
    b["load_other_cpu"] = phases.get("2 load (fresh arrays)", {}).get("other_cpu", 0.0)
    b["parse_other_cpu"] = phases.get("  parse_index", {}).get("other_cpu", 0.0)
    return b


def check(variables: list, step: int, what: str) -> None:
    bad = mismatches(variables, step)
    everyone = COMM.allgather(bad)
    wrong = {rank: names for rank, names in enumerate(everyone) if names}
    if wrong:
        if RANK == 0:
            print(f"{what} on {SIZE} ranks is not bit-exact: {wrong}", file=sys.stderr, flush=True)
        sys.exit(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="checkpoint directory (shared by the two phases)")
    p.add_argument("--phase", choices=("save", "restore"), required=True)
    p.add_argument("--repeat", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--profile", default=None, help="write cProfile stats of ranks 0 and 1 here")
    p.add_argument(
        "--spin",
        type=float,
        default=None,
        help="experiment: set shardsave._comm.SPIN (seconds agree's waits yield before sleeping)",
    )
    args = p.parse_args()
    launched = time.monotonic()
    if args.spin is not None:
        _comm.SPIN = args.spin
    probe = Probe()
    install(probe)
    profile = cProfile.Profile() if args.profile and RANK < 2 else None
    directory = os.path.abspath(args.dir)
    out: dict = {"ranks": SIZE, "phase": args.phase, "repeat": args.repeat, "spin": _comm.SPIN}
    if args.phase == "save":
        variables = model(RANK, SIZE, 1)
        saver = ss.Saver(variables, max_to_keep=2, comm=COMM)
        out["bytes"] = sum(COMM.allgather(sum(v.value.nbytes for v in variables)))
        steps = iter(range(1, args.repeat + 2))

        def save(_):
            saver.save(os.path.join(directory, "model"), global_step=next(steps))

        out["save"] = summary(timed_runs(probe, save, args.repeat + 1, profile))
        prefix = os.path.join(directory, f"model-{args.repeat + 1}")
    else:
        prefix = ss.latest_checkpoint(directory)
    targets = model(RANK, SIZE, None)
    reader = ss.Saver(targets, comm=COMM)

    def restore(i):
        for v in targets:
            v.value[...] = 0  # restore must bring every byte back
        reader.restore(prefix)

    out["restore"] = summary(timed_runs(probe, restore, args.repeat + 1, profile))
    check(targets, 1, f"restoring {prefix}")  # every save holds the values of step 1
    if profile is not None:
        os.makedirs(args.profile, exist_ok=True)
        profile.dump_stats(os.path.join(args.profile, f"{args.phase}-{SIZE}-rank{RANK}.prof"))
    if RANK == 0:
        out["brief"] = brief(out)
        out["index_bytes"] = os.path.getsize(prefix + ".index")
        out["run_s"] = time.monotonic() - launched
        out["ok"] = True
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
