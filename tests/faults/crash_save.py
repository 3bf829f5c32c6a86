"""Save a few checkpoints, then die in the middle of one more: run under mpiexec.

    mpiexec -n 3 python -m mpi4py tests/faults/crash_save.py --dir D --rows R \
        --steps 1 2 --crash-step 3 --fault writer|index|renames|final [--fixed] [--storage-options JSON]

``--fault writer``: rank ``--kill-rank`` writes all but the last 4 KiB of its first
large buffer, waits until every other rank has closed its data file (on a side
communicator, so nothing shardsave does is involved), then SIGKILLs itself.
``--fault index``: the coordinator SIGKILLs itself when it is about to publish the
``.index``, or the journal that stands for it in a staged save (every data file is
written and checked by then). ``--fault renames``: the coordinator SIGKILLs itself
after renaming the first staged data file to its final name (the journal is published).
``--fault final``: it SIGKILLs itself just before renaming the journal to ``.index``.
With ``--crash-step`` equal to one of ``--steps`` the crash happens while re-saving an
existing checkpoint; with ``--fixed`` every save goes to ``D/model.ckpt`` (no step in
the prefix, as in examples/save_model.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

from common import assign, make_vars
from mpi4py import MPI

import shardsave as ss
from shardsave import storage


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str, kill_rank: int, side) -> None:
    rank = MPI.COMM_WORLD.rank
    if fault == "writer":
        if rank == kill_rank:
            original = storage.Writer.write

            def write(self, buffer):
                view = memoryview(buffer).cast("B")
                if len(view) <= 8192:
                    return original(self, buffer)
                original(self, view[: len(view) - 4096])
                side.Barrier()  # every other rank has closed its data file
                die()

            storage.Writer.write = write
        else:
            original_close = storage.Writer.close

            def close(self):
                original_close(self)
                side.Barrier()

            storage.Writer.close = close
    elif fault == "index" and rank == 0:
        original_publish = storage.publish

        def publish(loc, data, *args, **kwargs):
            if loc.path.endswith((".index", ".pending")):
                die()
            return original_publish(loc, data, *args, **kwargs)

        storage.publish = publish
    elif fault == "renames" and rank == 0:
        original_rename_all = storage.rename_all

        def rename_all(pairs):
            original_rename_all(pairs[:1])
            die()

        storage.rename_all = rename_all
    elif fault == "final" and rank == 0:
        original_rename = storage.rename

        def rename(src, dst):
            if dst.path.endswith(".index"):
                die()
            return original_rename(src, dst)

        storage.rename = rename


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--steps", type=int, nargs="*", default=[])
    p.add_argument("--crash-step", type=int, default=None)
    p.add_argument("--fault", choices=["writer", "index", "renames", "final"], default=None)
    p.add_argument("--fixed", action="store_true", help="save every step to the same prefix")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--storage-options", default=None)
    p.add_argument("--part-bytes", type=int, default=None, help="S3 multipart part size")
    args = p.parse_args()
    if args.part_bytes:
        storage.s3.PART_BYTES = args.part_bytes
    comm = MPI.COMM_WORLD
    side = comm.Dup()
    options = json.loads(args.storage_options) if args.storage_options else None
    variables = make_vars(args.rows, comm.rank, comm.size)
    saver = ss.Saver(max_to_keep=5, comm=comm, storage_options=options)
    prefix = args.dir.rstrip("/") + "/model.ckpt"
    for step in args.steps:
        assign(variables, step, args.rows, comm.rank, comm.size)
        path = saver.save(prefix, global_step=None if args.fixed else step)
        if comm.rank == 0:
            print("saved", path, flush=True)
    if args.crash_step is not None:
        assign(variables, args.crash_step, args.rows, comm.rank, comm.size)
        install_fault(args.fault, args.kill_rank, side)
        saver.save(prefix, global_step=None if args.fixed else args.crash_step)
        print("ERROR: the save that should have crashed returned", flush=True)


if __name__ == "__main__":
    main()
