"""A long fuzz campaign: ``python -m tests.fuzz.campaign --minutes 20 --out DIR``.

Runs the saved corpus, then hypothesis-generated cases in batches, each batch with a new
random seed, until the time is up. Prints how many cases ran and every distinct finding
with its replay command (each saved as a case file under ``--out``); exits 1 on findings.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from hypothesis import HealthCheck, Phase, given, seed, settings

from . import mutate
from .engine import Fuzzer, corpus_cases
from .pool import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("FUZZ_MINUTES", 20)))
    parser.add_argument("--out", default=os.environ.get("FUZZ_OUT", "fuzz-findings"))
    parser.add_argument(
        "--target",
        default=os.environ.get("SHARDSAVE_FUZZ_TARGET", REPO),
        help="source tree whose shardsave the workers import (default: this one)",
    )
    parser.add_argument("--seed", type=int, default=None, help="first batch's random seed (default: random)")
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args(argv)
    stop = time.monotonic() + args.minutes * 60
    rng = random.Random(args.seed)
    with Fuzzer(target=os.path.abspath(args.target), out_dir=os.path.abspath(args.out)) as fz:
        for _, case in corpus_cases():
            fz.run(case)
        batches = 0
        while time.monotonic() < stop:
            batch_seed = rng.getrandbits(64)

            @seed(batch_seed)
            @settings(
                max_examples=args.batch,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(mutate.cases())
            def batch(case):
                if time.monotonic() < stop:
                    fz.run(case)

            batch()
            batches += 1
            print(
                f"[{time.strftime('%H:%M:%S')}] batch {batches} (seed {batch_seed}): {fz.cases} cases, "
                f"{len(fz.findings)} distinct findings",
                flush=True,
            )
        print(fz.report())
        return 1 if fz.findings else 0


if __name__ == "__main__":
    sys.exit(main())
