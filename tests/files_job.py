"""Saves with ``Saver(files_per_node=k)`` under mpiexec, ranks on nodes simulated with
SHARDSAVE_NODE_ID (tests/test_files_per_node.py launches it):

    mpiexec -n 4 -env SHARDSAVE_NODE_ID a python -m mpi4py tests/files_job.py --dir D save : -n 4 ...

``save``: for each ``--k``, save step 1 to ``D/k<k>/model`` and restore it into zeroed
variables (bit-exact); one of them (the first k) again non-blocking, as step 2 over step 1.
``D`` may be an S3 URL (``--storage-options``: JSON).
``restore``: restore ``D/k<k>/model-<step>`` on however many ranks this job has.
``fail``: save step 1 to ``D/fail-<case>/model``, then step 2 to the same prefix while
rank 4 (a writer) cannot grow its file past 1 MiB (RLIMIT_FSIZE), then while rank 5 (a
member) raises after sending its first buffer; every rank must raise the same error, and
step 1 must still restore. Rank 0 prints ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal

import numpy as np

import shardsave as ss
from shardsave import storage
from shardsave.save import gather

COMM = None  # MPI.COMM_WORLD, set by main (the test process imports the values only)
OPTIONS = None  # --storage-options (JSON): the S3 server's
EMB_ROWS, COLS = 4800, 256
BIG_ROWS, BIG_COLS = 4800, 1024
BIG_ON_5 = 4352  # 17 MiB on rank 5 of 8 (more than one 16 MiB stream piece); 64 rows elsewhere


def global_values(step: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([11, step])
    return {
        "emb": rng.standard_normal((EMB_ROWS, COLS)).astype(np.float32),
        "big": rng.standard_normal((BIG_ROWS, BIG_COLS)).astype(np.float32),
        "dense/kernel": rng.standard_normal((COLS, 8)),
        "per_rank": rng.integers(-(2**40), 2**40, (size, 16)),
        "step": np.int64(step),
        "names": np.array([b"alpha", b"", b"\x00\xff", b"step %d" % step], dtype=object),
    }


def rows_of(name: str, rank: int, size: int) -> tuple[int, int]:
    total = EMB_ROWS if name == "emb" else BIG_ROWS
    if name == "big" and size == 8:  # uneven: one rank holds most of it
        counts = [64] * 8
        counts[5] = BIG_ON_5
    else:
        base, extra = divmod(total, size)
        counts = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(counts[:rank])
    return start, start + counts[rank]


def make_vars(rank: int, size: int) -> dict:
    ss.reset_default_graph()
    out = {}
    for name, cols in (("emb", COLS), ("big", BIG_COLS)):
        lo, hi = rows_of(name, rank, size)
        total = EMB_ROWS if name == "emb" else BIG_ROWS
        out[name] = ss.Variable(
            name, dtype=np.float32, shape=(hi - lo, cols), global_shape=(total, cols), offset=(lo, 0)
        )
    out["dense/kernel"] = ss.Variable("dense/kernel", dtype=np.float64, shape=(COLS, 8))
    if size == 8:  # a row per rank (a restore on other rank counts leaves it out)
        out["per_rank"] = ss.Variable(
            "per_rank", dtype=np.int64, shape=(1, 16), global_shape=(size, 16), offset=(rank, 0)
        )
    out["step"] = ss.Variable("step", dtype=np.int64, shape=())
    out["names"] = ss.Variable("names", dtype=object, shape=(4,))
    return out


def assign(variables: dict, step: int, rank: int, size: int) -> None:
    for name, value in global_values(step, size).items():
        if name in ("emb", "big"):
            lo, hi = rows_of(name, rank, size)
            value = value[lo:hi]
        elif name == "per_rank":
            value = value[rank : rank + 1]
        variables[name].assign(value)


def zero(variables: dict) -> None:
    for name, var in variables.items():
        if name != "names":
            var.assign(np.zeros_like(var.value))


def check(variables: dict, step: int, rank: int, size: int) -> None:
    """Bit-exact: this rank's blocks of the values of ``step`` (saved from 8 ranks)."""
    want = global_values(step, 8)
    for name, var in variables.items():
        value = want[name]
        if name in ("emb", "big"):
            lo, hi = rows_of(name, rank, size)
            value = value[lo:hi]
        elif name == "per_rank":
            value = value[rank : rank + 1]
        got = var.value
        if value.dtype == object:
            assert list(got) == list(value), (rank, name)
        else:
            assert got.dtype == value.dtype and got.shape == value.shape, (rank, name, got.shape)
            assert got.tobytes() == value.tobytes(), f"rank {rank}: {name} differs from step {step}"


def data_files(directory: str) -> list[str]:
    listing = storage.files_in(storage.resolve(directory, OPTIONS))
    return sorted(n for n in listing if ".data-" in n)


def save_phase(args, rank: int, size: int) -> dict:
    out = {}
    for i, k in enumerate(args.k):
        variables = make_vars(rank, size)
        assign(variables, 1, rank, size)
        directory = f"{args.dir}/k{k}"
        saver = ss.Saver(variables, comm=COMM, files_per_node=k, timeout=60, storage_options=OPTIONS)
        prefix = saver.save(f"{directory}/model", global_step=1)
        zero(variables)
        saver.restore(prefix)
        check(variables, 1, rank, size)
        if i == 0 and not args.once:  # non-blocking, over a checkpoint already there
            assign(variables, 2, rank, size)
            handle = saver.save(f"{directory}/model", global_step=2, blocking=False)
            assign(variables, 3, rank, size)  # training goes on: the save has its copy
            assert handle.result() == f"{directory}/model-2"
            zero(variables)
            saver.restore(f"{directory}/model-2")
            check(variables, 2, rank, size)
        saver.close()
        COMM.Barrier()
        out[k] = data_files(directory) if rank == 0 else None
    return out


def restore_phase(args, rank: int, size: int) -> dict:
    for k in args.k:
        variables = make_vars(rank, size)
        saver = ss.Saver(variables, comm=COMM, timeout=60)
        saver.restore(os.path.join(args.dir, f"k{k}", "model-1"))
        check(variables, 1, rank, size)
        saver.close()
    return {"restored": args.k}


def fail_phase(args, rank: int, size: int) -> dict:
    """A writer that cannot write (rank 4: RLIMIT_FSIZE of 1 MiB, so EFBIG while it writes
    rank 5's bytes), then a member that raises (rank 5, after its first buffer)."""
    out = {}
    for case in ("writer", "member"):
        directory = os.path.join(args.dir, f"fail-{case}")
        variables = make_vars(rank, size)
        assign(variables, 1, rank, size)
        saver = ss.Saver(variables, comm=COMM, files_per_node=args.k[0], timeout=60)
        prefix = saver.save(os.path.join(directory, "model"))
        before = data_files(directory)
        assign(variables, 2, rank, size)
        undo = _inject(case, rank)
        error = None
        try:
            saver.save(prefix)
        except ss.ShardsaveError as exc:
            error = f"{type(exc).__name__}: {exc}"
        undo()
        errors = COMM.allgather(error)
        zero(variables)
        saver.restore(prefix)  # the previous checkpoint, whole
        check(variables, 1, rank, size)
        saver.close()
        COMM.Barrier()
        out[case] = {
            "errors": errors,
            "before": before,
            "after": data_files(directory) if rank == 0 else None,
        }
    return out


def _inject(case: str, rank: int):
    if case == "writer" and rank == 4:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    if case == "member" and rank == 5:
        original = gather._Sender.write

        def write(self, buffer):
            if self.sent:
                raise RuntimeError(f"injected failure on rank 5 after {self.sent} bytes")
            original(self, buffer)

        gather._Sender.write = write
        return lambda: setattr(gather._Sender, "write", original)
    return lambda: None


def main() -> None:
    global COMM, OPTIONS
    from mpi4py import MPI

    COMM = MPI.COMM_WORLD
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["save", "restore", "fail"])
    p.add_argument("--dir", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1])
    p.add_argument("--storage-options", type=json.loads, default=None)
    p.add_argument("--once", action="store_true", help="save: no second, non-blocking save")
    args = p.parse_args()
    OPTIONS = args.storage_options
    rank, size = COMM.rank, COMM.size
    out = {"save": save_phase, "restore": restore_phase, "fail": fail_phase}[args.phase](args, rank, size)
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
