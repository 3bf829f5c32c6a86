"""Which CRC32C package: speed on this machine and trust (RFC 3720's vectors, continuation).

    python benchmarks/crc_bench.py   # packages that are not installed are skipped

Candidates: ``crc32c`` (ICRAR; the one in use), ``google-crc32c``, ``fastcrc``'s
``crc32.iscsi``. Each is timed on one 256 MiB buffer and on the same bytes in 64 KiB
blocks (the checksum block of large entries), on 1 and 2 threads (a package that holds the
GIL does not scale), median of 5, in CPU-s per GiB.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# RFC 3720, B.4: CRC32C of 32 bytes of zeros, of ones, ascending and descending; and "123456789"
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
]


def candidates() -> dict:
    out = {}
    try:
        import crc32c

        out["crc32c " + getattr(crc32c, "__version__", "?")] = lambda d, v=0: crc32c.crc32c(d, v)
    except ImportError:
        pass
    try:
        import google_crc32c

        # its C extension takes bytes only (not a memoryview of an array): a copy per call in
        # use; timed here on bytes made beforehand, so the figure is its best case
        out[f"google-crc32c ({google_crc32c.implementation}, bytes only)"] = lambda d, v=0: (
            google_crc32c.extend(v, d if isinstance(d, bytes) else bytes(d))
        )
    except ImportError:
        pass
    try:
        import fastcrc

        out["fastcrc iscsi"] = lambda d, v=0: fastcrc.crc32.iscsi(d, v) if v else fastcrc.crc32.iscsi(d)
    except ImportError:
        pass
    return out


def trusted(fn) -> bool:
    if any(fn(data) != want for data, want in VECTORS):
        return False
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    whole = fn(data)
    parts = 0
    for lo in range(0, len(data), 65536 + 7):
        parts = fn(memoryview(data)[lo : lo + 65536 + 7], parts)
    return parts == whole and fn(memoryview(np.frombuffer(data, np.uint8))) == whole


def timed(fn, buf, block: int | None, threads: int, bytes_only: bool) -> float:
    view = memoryview(buf)
    pieces = [view] if block is None else [view[i : i + block] for i in range(0, len(view), block)]
    if bytes_only:
        pieces = [bytes(p) for p in pieces]
    shares = [pieces[i::threads] for i in range(threads)]

    def run(share):
        for p in share:
            fn(p)

    runs = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(6):
            t = time.perf_counter()
            list(pool.map(run, shares))
            runs.append(time.perf_counter() - t)
    return statistics.median(runs[1:])


def main() -> int:
    buf = np.random.default_rng(1).integers(0, 256, 256 << 20, dtype=np.uint8)
    gib = buf.nbytes / 2**30
    out = {}
    for name, fn in candidates().items():
        row = {"trusted": trusted(fn)}
        for label, block in (("whole", None), ("64KiB", 65536)):
            for threads in (1, 2):
                s = timed(fn, buf, block, threads, "bytes only" in name)
                row[f"{label} {threads}t GB/s"] = round(gib * 2**30 / s / 1e9, 2)
                if threads == 1:
                    row[f"{label} CPU-s/GiB"] = round(s / gib, 3)
        out[name] = row
        print(name, row, file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
