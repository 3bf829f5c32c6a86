"""Replay saved fuzz cases: ``python -m tests.fuzz.replay CASE.json [...] [--target DIR]``.

Run from the repository root. The case's checkpoint is rebuilt from the seeds (with this
tree's shardsave) and run by a worker that imports ``shardsave`` from ``--target`` (default
$SHARDSAVE_FUZZ_TARGET, else this tree). Prints every operation's outcome and each
finding with its traceback; exits 1 if there is a finding. ``--keep DIR`` copies the
crafted checkpoint to DIR so it can be opened by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from .engine import Fuzzer, load_case_file
from .pool import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="case files (JSON), as saved by the fuzzer or in corpus/")
    parser.add_argument("--target", default=os.environ.get("SHARDSAVE_FUZZ_TARGET", REPO))
    parser.add_argument("--keep", help="copy the crafted checkpoint files into this directory")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the findings")
    parser.add_argument(
        "--summary", action="store_true", help="one line per case: its findings or 'no finding'"
    )
    args = parser.parse_args(argv)
    found_any = False
    with Fuzzer(target=os.path.abspath(args.target)) as fz:
        for path in args.cases:
            case = load_case_file(path)
            if not args.summary:
                print(f"== {path}\n   {json.dumps(case)}")
            findings = fz.run(case)
            distinct = {f.signature: f for f in findings}
            found_any |= bool(distinct)
            if args.summary:
                what = "; ".join(" ".join(sig) for sig in distinct) or "no finding"
                print(f"{os.path.basename(path)}: {what}", flush=True)
                continue
            if args.keep:
                shutil.copytree(
                    os.path.join(fz.root, "case"),
                    os.path.join(args.keep, os.path.basename(path)),
                    dirs_exist_ok=True,
                )
            if not args.quiet and fz.last_result is not None:
                for op in fz.last_result["ops"]:
                    extra = (
                        f" {op.get('type', '')}: {op.get('msg', '')[:150]}" if op["status"] != "ok" else ""
                    )
                    print(f"   {op['status']:8} {op['op']}{extra}")
            for f in distinct.values():
                print(f"   FINDING {fz.findings[f.signature].line()}\n{f.detail}")
            if not distinct:
                print("   no finding")
    return 1 if found_any else 0


if __name__ == "__main__":
    sys.exit(main())
