"""What a restoring rank spends on a large index (restore step 1, then its lookups).

Run as ``mpiexec -n N python -m mpi4py benchmarks/index_share_bench.py --prefix P``, P
the prefix of an index made by ``index_bench.py`` (``--path P.index``: 10,000 ranks x
1,000 variables of 64 rows). Every rank gets the index as a restore does
(``restore.index.read_index``: the coordinator reads it, the ranks get its bytes, shared
per node from ``shared_bytes.SHARE_MIN_BYTES``; ``--private``: a copy on every rank), then
finds the pieces of every variable that one saved rank's rows need, as a restore with a
different number of ranks would (``Pieces.start_before`` / ``starting_in``). Reports per
rank the seconds of each step, its private memory (RssAnon), the node-shared pages it
maps (RssShmem) and its peak growth. Simulate nodes with MPICH's MPMD syntax and
``SHARDSAVE_NODE_ID`` (``-n 2 -env SHARDSAVE_NODE_ID a ... : -n 2 -env ...``).
"""

from __future__ import annotations

import argparse
import json
import time

from index_bench import _status as status_kib

from shardsave import storage
from shardsave._comm import Comm, shared_bytes
from shardsave.restore.index import read_index

ROWS = 64


def _status() -> dict[str, int]:
    """VmHWM, RssAnon and RssShmem of /proc/self/status, in MiB."""
    return {field: status_kib(field) // 1024 for field in ("VmHWM", "RssAnon", "RssShmem")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", required=True)
    p.add_argument("--private", action="store_true", help="no node-shared copy")
    p.add_argument("--saved-ranks", type=int, default=10000)
    args = p.parse_args()
    if args.private:
        shared_bytes.SHARE_MIN_BYTES = 1 << 62
    comm = Comm.create(timeout=600)
    loc = storage.resolve(args.prefix)
    comm.every_rank("warm-up", lambda: None)
    before = _status()
    t0 = time.perf_counter()
    index = read_index(loc, comm, "reading the index")
    t1 = time.perf_counter()
    saved = (comm.rank * 7919) % args.saved_ranks  # some saved rank's rows
    found = 0
    for name in index.pieces:
        start = index.pieces.start_before(name, 2, saved * ROWS + 1)
        found += len(index.pieces.starting_in(name, 2, start, saved * ROWS + ROWS))
    t2 = time.perf_counter()
    after = _status()
    row = {
        "rank": comm.rank,
        "index_s": round(t1 - t0, 3),
        "lookups_s": round(t2 - t1, 3),
        "pieces": found,
        "private_mib": after["RssAnon"] - before["RssAnon"],
        "shared_mib": after["RssShmem"] - before["RssShmem"],
        "peak_growth_mib": after["VmHWM"] - before["VmHWM"],
    }
    rows = comm.gather(row)
    if comm.is_coordinator:
        print(json.dumps({"ranks": comm.size, "private": args.private, "per_rank": rows}))


if __name__ == "__main__":
    main()
