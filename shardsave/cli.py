"""The ``shardsave`` command: inspect, ls and gc checkpoints on any fsspec URL.

Storage options for fsspec (e.g. an S3 endpoint) come from ``--storage-options JSON`` or,
when that flag is absent, the environment variable ``SHARDSAVE_STORAGE_OPTIONS`` (the
flag wins; they are not merged). S3 endpoint and credentials otherwise come from the
usual AWS chain: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws``, instance roles.

``gc`` cleans up after failed saves: it finishes a save interrupted after its commit point
(commit.py) and deletes data files of checkpoints that have no index, staged files of
saves that never committed, temp files of interrupted publishes, and on S3 unfinished
multipart uploads of data files, all directly in the directory and matched by exact name
(never a glob; the state file is not read). Run it when no job is saving to the
directory: a save in progress looks the same.
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
from .errors import InvalidArgumentError, NotFoundError, ShardsaveError
from .format import dtypes, names
from .reader import CheckpointReader
from .save import commit

_STEP = re.compile(r"-(\d+)$")


_OPTIONS_HELP = 'fsspec storage options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\' (default: $SHARDSAVE_STORAGE_OPTIONS)'
_EPILOG = """Storage: PATH and DIR may be local paths or fsspec URLs (s3://bucket/run).
fsspec options come from --storage-options JSON or else $SHARDSAVE_STORAGE_OPTIONS;
S3 endpoint and credentials also from the AWS chain ($AWS_ENDPOINT_URL,
$AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY, $AWS_PROFILE, ~/.aws, instance roles)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardsave",
        description="Inspect and manage shardsave/TensorFlow checkpoints.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--storage-options", default=None, metavar="JSON", help=_OPTIONS_HELP)
    # also accepted after the subcommand (shardsave ls DIR --storage-options ...)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", default=argparse.SUPPRESS, metavar="JSON", help=_OPTIONS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect", parents=[common], help="list the tensors of a checkpoint (prefix or directory)"
    )
    p.add_argument("path", help="checkpoint prefix, or a directory with a 'checkpoint' state file")
    p.add_argument("--tensor", default=None, help="show only this tensor")
    p.add_argument("--values", action="store_true", help="print tensor values too")
    p = sub.add_parser("ls", parents=[common], help="list the checkpoints of a directory, newest last")
    p.add_argument("directory")
    p = sub.add_parser(
        "gc",
        parents=[common],
        help="delete leftovers of failed saves: data files with no index, "
        "temp files, unfinished S3 uploads (run when no job is saving there)",
    )
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
        pieces = len(entry.slices)
        where = f"  [{pieces} slices]" if pieces else ""
        print(f"{name}  {dtypes.tf_name(entry.dtype)}  {list(entry.shape)}{where}")
        if args.values:
            with np.printoptions(threshold=1000, edgeitems=3):
                print(reader.get_tensor(name))
    total = sum(math.prod(shapes[n]) for n in names)
    print(f"# Total number of params: {total}")


def _directory(directory: str, options) -> storage.Location:
    """``directory`` resolved; a local one must exist and be a directory (on S3 every
    prefix is a directory, an empty one when nothing is stored under it)."""
    loc = storage.resolve(directory, options)
    if loc.is_local and not os.path.isdir(loc.path):
        problem = "not a directory" if os.path.exists(loc.path) else "no such directory"
        raise NotFoundError(f"{directory}: {problem}")
    return loc


def _checkpoints(directory: str, options) -> list[dict]:
    """The committed checkpoints of ``directory``, from one listing of it."""
    files = storage.scan(_directory(directory, options))
    data_bytes: dict[str, int] = {}
    for f, i in files:
        parsed = names.parse_data_file_name(f.name)
        if parsed is not None:
            data_bytes[parsed[0]] = data_bytes.get(parsed[0], 0) + i["size"]
    out = []
    for index_loc, index_info in files:
        name = names.prefix_of_index(index_loc.name)
        if name is None:
            continue
        step = _STEP.search(name)
        out.append(
            {
                "prefix": name,
                "step": int(step.group(1)) if step else None,
                "bytes": index_info["size"] + data_bytes.get(name, 0),
                "mtime": index_info["mtime"] or 0.0,
            }
        )
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


def leftovers(directory: str, options) -> tuple[list[storage.Location], list[tuple], list[commit.Recovery]]:
    """What failed saves left behind in ``directory``: data files whose checkpoint has no
    index, temp files of interrupted publishes, (S3) unfinished uploads of data files,
    and the recoveries of interrupted saves (commit.py: roll forward, or delete their
    staged files).

    Only files directly in ``directory`` whose names are exactly those shardsave writes
    (``<prefix>.data-SSSSS-of-NNNNN``, ``<prefix>.index.tmp<hex>``, ``checkpoint.tmp<hex>``,
    staged files) are candidates; the state file is not read, so nothing outside is ever
    touched.
    """
    loc = _directory(directory, options)
    listing = storage.files_in(loc)
    recoveries = [commit.plan(loc.child(base), listing) for base in sorted(commit.in_flight(listing))]
    files = [loc.child(name) for name in sorted(listing)]
    committed = {p for p in map(names.prefix_of_index, listing) if p is not None}
    committed |= {r.prefix.name for r in recoveries if r.journal is not None}

    def orphan(name: str) -> bool:
        parsed = names.parse_data_file_name(name)
        return parsed is not None and parsed[0] not in committed

    doomed = [f for f in files if orphan(f.name) or names.is_publish_temp(f.name)]
    uploads = [
        u for u in storage.pending_uploads(loc) if orphan(u[0].name) or commit.is_staged_name(u[0].name)
    ]
    return doomed, uploads, recoveries


def cmd_gc(args, options) -> None:
    doomed, uploads, recoveries = leftovers(args.directory, options)
    verb = "would delete " if args.dry_run else "deleting "
    for r in recoveries:
        if r.journal is not None:
            print(
                ("would finish " if args.dry_run else "finishing ")
                + "the interrupted save of "
                + r.prefix.url
            )
    doomed = [f for r in recoveries for f in r.doomed] + doomed
    for f in doomed:
        print(verb + f.url)
    for f, _, _ in uploads:
        print(("would abort " if args.dry_run else "aborting ") + "unfinished upload of " + f.url)
    if not args.dry_run:
        for r in recoveries:
            commit.apply(r)
        storage.remove(doomed)
        for f, upload_id, _ in uploads:
            storage.abort_upload(f, upload_id)
    done = "found" if args.dry_run else "deleted"
    print(
        f"{len(doomed)} leftover file(s) {done}"
        + (f", {len(uploads)} unfinished upload(s)" if uploads else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = storage_options_from(args.storage_options)
        {"inspect": cmd_inspect, "ls": cmd_ls, "gc": cmd_gc}[args.command](args, options)
    except (ShardsaveError, OSError) as exc:  # OSError: a backend's, should one escape
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"shardsave {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
