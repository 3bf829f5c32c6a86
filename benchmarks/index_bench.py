"""Workload (e): an index of many slice entries (many ranks x many variables).

Times the coordinator's merge of what every rank sends (each rank encodes its own
entries, in parallel, before sending; that part is not the coordinator's and is not
timed), writing the index, and reading and parsing it back; reports bytes per entry.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from shardsave.format.entry import encode_entry
from shardsave.format.index import entry_key, parse_index
from shardsave.format.merge import encode_rank_part, merge_index


def synthetic_parts(ranks: int, variables: int, rows: int = 64, cols: int = 1024):
    """What ``ranks`` ranks would send, each holding rows of every variable."""
    rng = random.Random(0)
    sliced = {f"model/layer{v:04d}/kernel": (1, (ranks * rows, cols)) for v in range(variables)}
    parts = []
    for r in range(ranks):
        offset = 0
        entries = []
        for name in sliced:
            size = rows * cols * 4
            key = entry_key(name, [(r * rows, rows), (0, cols)])
            entries.append((key, encode_entry(1, (rows, cols), r, offset, size, rng.getrandbits(32))))
            offset += size
        values = [value for _, value in entries]
        parts.append(
            encode_rank_part([key for key, _ in entries], b"".join(values), list(map(len, values)), sliced)
        )
    return parts, sliced


def run(ranks: int, variables: int, path: str) -> dict:
    parts, sliced = synthetic_parts(ranks, variables)
    n = ranks * variables
    t0 = time.perf_counter()
    data = merge_index(ranks, parts, sliced)
    t1 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    t2 = time.perf_counter()
    with open(path, "rb") as f:
        index = parse_index(f.read())
    t3 = time.perf_counter()
    assert len(index.entries) == variables and sum(index.pieces._counts.values()) == n
    return {
        "entries": n,
        "merge_s": t1 - t0,
        "write_s": t2 - t1,
        "read_s": t3 - t2,
        "total_s": t3 - t0,
        "bytes": len(data),
        "bytes_per_entry": len(data) / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1000)
    p.add_argument("--variables", type=int, default=1000)
    p.add_argument("--path", default="/tmp/shardsave-index-bench.index")
    args = p.parse_args()
    print(json.dumps(run(args.ranks, args.variables, args.path)))


if __name__ == "__main__":
    main()
