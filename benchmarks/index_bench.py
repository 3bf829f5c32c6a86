"""Workload (e): an index of many slice entries (many ranks x many variables).

Times the coordinator's merge of what every rank sends (each rank encodes its own
entries, in parallel, before sending; that part is not the coordinator's and is not
timed), writing the index, and reading and parsing it back; reports bytes per entry and
the coordinator's peak memory above the inputs (the kernel's high-water mark, reset
after the inputs are made), and the CPU seconds of each step (the wall clock of a machine
shared with other jobs varies more).

The parts are generated column-wise from per-rank templates (``--slow-parts``: through
``encode_rank_part``, entry by entry as a real rank does; minutes at 10M entries).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import time

import numpy as np

from shardsave.format.columns import encode_plain_columns
from shardsave.format.entry import encode_entry, slice_field
from shardsave.format.index import entry_key, parse_index
from shardsave.format.merge import RankIndexPart, encode_rank_part, merge_index, records_of
from shardsave.format.ordered_code import write_string

ROWS, COLS = 64, 1024


def _names(variables: int) -> list[str]:
    return [f"model/layer{v:04d}/kernel" for v in range(variables)]


def slow_parts(ranks: int, variables: int):
    """What ``ranks`` ranks would send, each holding rows of every variable."""
    rng = random.Random(0)
    sliced = {name: (1, (ranks * ROWS, COLS)) for name in _names(variables)}
    parts = []
    for r in range(ranks):
        offset = 0
        entries = []
        for name in sliced:
            size = ROWS * COLS * 4
            key = entry_key(name, [(r * ROWS, ROWS), (0, COLS)])
            entries.append((key, encode_entry(1, (ROWS, COLS), r, offset, size, rng.getrandbits(32))))
            offset += size
        values = [value for _, value in entries]
        parts.append(
            encode_rank_part([key for key, _ in entries], b"".join(values), list(map(len, values)), sliced)
        )
    return parts, sliced


def fast_parts(ranks: int, variables: int):
    """``slow_parts``' bytes, made column-wise: every rank's keys are the tensors' key
    heads followed by that rank's extents, its values one bulk encode."""
    names = _names(variables)
    sliced = {name: (1, (ranks * ROWS, COLS)) for name in names}
    heads = [b"\x00" + write_string(name.encode()) for name in names]
    assert len(set(map(len, heads))) == 1
    head_matrix = np.frombuffer(b"".join(heads), np.uint8).reshape(variables, -1)
    rng = np.random.default_rng(0)
    size = ROWS * COLS * 4
    offsets = list(range(0, size * variables, size))
    parts = []
    for r in range(ranks):
        extents = [(r * ROWS, ROWS), (0, COLS)]
        tail = entry_key(names[0], extents)[head_matrix.shape[1] :]
        keys = np.hstack([head_matrix, np.tile(np.frombuffer(tail, np.uint8), (variables, 1))])
        crcs = rng.integers(1, 1 << 32, variables, dtype=np.uint64).tolist()
        values, lengths = encode_plain_columns(
            [1] * variables, [(ROWS, COLS)] * variables, r, offsets, [size] * variables, crcs
        )
        field = slice_field(extents)
        parts.append(
            RankIndexPart(
                records_of(keys.tobytes(), np.full(variables, keys.shape[1]), values, lengths),
                np.full(variables, keys.shape[1], np.int64),
                lengths,
                np.arange(variables, dtype=np.int64),
                np.full(variables, head_matrix.shape[1], np.int64),
                field * variables,
                np.full(variables, len(field), np.int64),
            )
        )
    return parts, sliced


def _status(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current
        f.write("5")


def run(ranks: int, variables: int, path: str, *, slow: bool = False, profile: str | None = None) -> dict:
    t = time.perf_counter()
    parts, sliced = (slow_parts if slow else fast_parts)(ranks, variables)
    generate_s = time.perf_counter() - t
    n = ranks * variables
    base = _status("VmRSS")
    _reset_peak()
    prof = cProfile.Profile(time.process_time) if profile else None
    if prof:
        prof.enable()
    c0, t0 = time.process_time(), time.perf_counter()
    data = merge_index(ranks, parts, sliced)
    c1, t1 = time.process_time(), time.perf_counter()
    merge_peak = _status("VmHWM") - base
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    c2, t2 = time.process_time(), time.perf_counter()
    size = len(data)
    del data
    with open(path, "rb") as f:
        index = parse_index(f.read())
    c3, t3 = time.process_time(), time.perf_counter()
    if prof:
        prof.disable()
        prof.dump_stats(profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    peak = _status("VmHWM") - base
    assert len(index.entries) == variables and len(index.pieces) == variables
    return {
        "entries": n,
        "generate_s": round(generate_s, 2),
        "merge_s": round(t1 - t0, 3),
        "write_s": round(t2 - t1, 3),
        "read_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "cpu_s": [round(c1 - c0, 3), round(c2 - c1, 3), round(c3 - c2, 3)],
        "merge_peak_mib": round(merge_peak / 1024),
        "peak_mib": round(peak / 1024),
        "inputs_mib": round(base / 1024),
        "bytes": size,
        "bytes_per_entry": round(size / n, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1000)
    p.add_argument("--variables", type=int, default=1000)
    p.add_argument("--path", default="/tmp/shardsave-index-bench.index")
    p.add_argument("--slow-parts", action="store_true", help="make the parts entry by entry")
    p.add_argument("--profile", metavar="FILE", help="cProfile the timed part into FILE")
    args = p.parse_args()
    print(json.dumps(run(args.ranks, args.variables, args.path, slow=args.slow_parts, profile=args.profile)))


if __name__ == "__main__":
    main()
