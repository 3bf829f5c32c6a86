"""One process saving ``D/model.ckpt`` that stops, its data file written, until told to go on.

    python tests/faults/paused_save.py --dir D --rows R --step S --flag F [--storage-options JSON]

It assigns the values of ``--step``, saves on one rank, and once its data file is closed
creates ``F.ready`` and waits for ``F.go`` to exist before the save goes on to its commit,
so a test can run a second job's save of the same prefix in between (two jobs saving into
one directory). It prints ``saved PREFIX`` or ``error CLASS: MESSAGE``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import assign, make_vars

import shardsave as ss
from shardsave import storage


def pause_after_closing(flag: str) -> None:
    original_close = storage.Writer.close

    def close(self):
        original_close(self)
        open(flag + ".ready", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(flag + ".go") and time.monotonic() < deadline:
            time.sleep(0.01)

    storage.Writer.close = close


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--flag", required=True)
    p.add_argument("--storage-options", default=None)
    args = p.parse_args()
    options = json.loads(args.storage_options) if args.storage_options else None
    variables = make_vars(args.rows)
    assign(variables, args.step, args.rows)
    saver = ss.Saver(storage_options=options)
    pause_after_closing(args.flag)
    try:
        print("saved", saver.save(args.dir.rstrip("/") + "/model.ckpt"), flush=True)
    except ss.ShardsaveError as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
