"""The ``shardsave`` command: inspect, ls and gc checkpoints on any fsspec URL.

Storage options for fsspec (e.g. an S3 endpoint) come from ``--storage-options JSON`` or
the environment variable ``SHARDSAVE_STORAGE_OPTIONS``; S3 credentials from the usual AWS
chain (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys

import numpy as np

from . import storage
from .checkpoint_state import get_checkpoint_state
from .errors import InvalidArgumentError, ShardsaveError
from .format import dtypes
from .reader import CheckpointReader

_STEP = re.compile(r"-(\d+)$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardsave", description="Inspect and manage shardsave/TensorFlow checkpoints.")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec storage options as JSON (default: $SHARDSAVE_STORAGE_OPTIONS)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the tensors of a checkpoint (prefix or directory)")
    p.add_argument("path", help="checkpoint prefix, or a directory with a 'checkpoint' state file")
    p.add_argument("--tensor", default=None, help="show only this tensor")
    p.add_argument("--values", action="store_true", help="print tensor values too")
    p = sub.add_parser("ls", help="list the checkpoints of a directory, newest last")
    p.add_argument("directory")
    p = sub.add_parser("gc", help="delete leftovers of failed saves (data files with no index)")
    p.add_argument("directory")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    return parser


def storage_options_from(arg: str | None) -> dict | None:
    text = arg if arg is not None else os.environ.get("SHARDSAVE_STORAGE_OPTIONS")
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"storage options are not valid JSON: {exc}: {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"storage options must be a JSON object, got {text!r}")
    return value


def cmd_inspect(args, options) -> None:
    reader = CheckpointReader(args.path, storage_options=options)
    index = reader.get_entries()
    shapes = reader.get_variable_to_shape_map()
    names = sorted(shapes)
    if args.tensor is not None:
        reader.get_tensor(args.tensor)  # raises NotFoundError with close names
        names = [args.tensor]
    print(f"checkpoint: {reader.prefix}  ({index.header.num_shards} data file(s))")
    for name in names:
        entry = index.entries[name]
        pieces = len(index.pieces.get(name, {}))
        where = f"  [{pieces} slices]" if pieces else ""
        print(f"{name}  {dtypes.tf_name(entry.dtype)}  {list(entry.shape)}{where}")
        if args.values:
            with np.printoptions(threshold=1000, edgeitems=3):
                print(reader.get_tensor(name))
    total = sum(math.prod(shapes[n]) for n in names)
    print(f"# Total number of params: {total}")


def _checkpoints(directory: str, options) -> list[dict]:
    loc = storage.resolve(directory, options)
    out = []
    for index_loc in storage.glob(loc, "*.index"):
        name = index_loc.name[: -len(".index")]
        files = [index_loc] + storage.glob(loc, name + ".data-*-of-*")
        infos = [storage.info(f) for f in files]
        step = _STEP.search(name)
        out.append({
            "prefix": name,
            "step": int(step.group(1)) if step else None,
            "bytes": sum(i["size"] for i in infos),
            "mtime": infos[0]["mtime"] or 0.0,
        })
    out.sort(key=lambda c: (c["mtime"], c["step"] or 0))
    return out


def cmd_ls(args, options) -> None:
    ckpts = _checkpoints(args.directory, options)
    state = get_checkpoint_state(args.directory, storage_options=options)
    latest = os.path.basename(state.model_checkpoint_path) if state else None
    if not ckpts:
        print(f"no checkpoints in {args.directory}")
        return
    print(f"{'checkpoint':<32} {'step':>8} {'size':>12}  time")
    for c in ckpts:
        when = datetime.datetime.fromtimestamp(c["mtime"]).isoformat(sep=" ", timespec="seconds")
        mark = "  (latest)" if c["prefix"] == latest else ""
        step = "-" if c["step"] is None else str(c["step"])
        print(f"{c['prefix']:<32} {step:>8} {c['bytes']:>12}  {when}{mark}")


def leftovers(directory: str, options) -> list[storage.Location]:
    """Data files whose checkpoint has no index, and temp files of interrupted publishes."""
    loc = storage.resolve(directory, options)
    committed = {f.name[: -len(".index")] for f in storage.glob(loc, "*.index")}
    out = []
    for f in storage.glob(loc, "*.data-*-of-*"):
        prefix = f.name.rsplit(".data-", 1)[0]
        if prefix not in committed:
            out.append(f)
    out += storage.glob(loc, "*.index.tmp*") + storage.glob(loc, "checkpoint.tmp*")
    return out


def cmd_gc(args, options) -> None:
    doomed = leftovers(args.directory, options)
    for f in doomed:
        print(("would delete " if args.dry_run else "deleting ") + f.url)
    if not args.dry_run:
        storage.remove(doomed)
    print(f"{len(doomed)} leftover file(s)" + (" found" if args.dry_run else " deleted"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = storage_options_from(args.storage_options)
        {"inspect": cmd_inspect, "ls": cmd_ls, "gc": cmd_gc}[args.command](args, options)
    except ShardsaveError as exc:
        print(f"shardsave {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
