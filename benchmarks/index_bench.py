"""Workload (e): an index of many slice entries (many ranks x many variables).

Times the coordinator's merge (sorting and encoding every rank's entries into one
index), writing it, and reading and parsing it back; reports the bytes per entry.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from shardsave.format.bundle import BundleEntry, BundleHeader, build_index, entry_key, parse_index


def synthetic_entries(ranks: int, variables: int, rows: int = 64, cols: int = 1024):
    """What ``ranks`` ranks would send, each holding rows of every variable."""
    rng = random.Random(0)
    per_rank = []
    for r in range(ranks):
        offset = 0
        entries = []
        for v in range(variables):
            size = rows * cols * 4
            key = entry_key(f"model/layer{v:04d}/kernel", [(r * rows, rows), (0, cols)])
            entries.append((key, BundleEntry(dtype=1, shape=(rows, cols), shard_id=r, offset=offset, size=size,
                                             crc32c=rng.getrandbits(32))))
            offset += size
        per_rank.append(entries)
    full = [
        (entry_key(f"model/layer{v:04d}/kernel"),
         BundleEntry(dtype=1, shape=(ranks * rows, cols),
                     slices=tuple(((r * rows, rows), (0, cols)) for r in range(ranks))))
        for v in range(variables)
    ]
    return per_rank, full


def run(ranks: int, variables: int, path: str) -> dict:
    per_rank, full = synthetic_entries(ranks, variables)
    n = ranks * variables
    t0 = time.perf_counter()
    merged = [e for entries in per_rank for e in entries] + full
    data = build_index(BundleHeader(num_shards=ranks), merged)
    t1 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    t2 = time.perf_counter()
    with open(path, "rb") as f:
        index = parse_index(f.read())
    t3 = time.perf_counter()
    assert sum(len(p) for p in index.pieces.values()) == n
    return {"entries": n, "merge_s": t1 - t0, "write_s": t2 - t1, "read_s": t3 - t2,
            "total_s": t3 - t0, "bytes": len(data), "bytes_per_entry": len(data) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1000)
    p.add_argument("--variables", type=int, default=1000)
    p.add_argument("--path", default="/tmp/shardsave-index-bench.index")
    args = p.parse_args()
    print(json.dumps(run(args.ranks, args.variables, args.path)))


if __name__ == "__main__":
    main()
