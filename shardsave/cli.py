"""The ``shardsave`` command: inspect, ls, verify, diff and gc checkpoints on any fsspec URL,
and scavenge a fast tier (tiers/scavenge.py).

A checkpoint may be named by its prefix, by one of its files (``P.index``,
``P.data-00000-of-00002``) or by a directory (its latest checkpoint, from the state file).
Exit status: 0 on success, 1 on an error or damage (``verify``), 2 on a usage error;
``diff`` exits 0 when the checkpoints are the same, 1 when they differ, 2 on an error.

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
import time

import numpy as np

from . import storage
from ._diff import differences
from ._paths import checkpoint_prefix, file_checkpoint
from ._verify import Report, verify_checkpoint
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
    what = "checkpoint prefix, one of its files (P.index, P.data-...), or a directory (its latest)"
    p = sub.add_parser(
        "inspect", parents=[common], help="list the tensors of a checkpoint (prefix, file or directory)"
    )
    p.add_argument("path", help=what)
    p.add_argument("--tensor", default=None, help="show only this tensor")
    p.add_argument("--values", action="store_true", help="print tensor values too")
    p = sub.add_parser(
        "ls",
        parents=[common],
        help="list the checkpoints of a directory, newest last (or the files of one checkpoint)",
    )
    p.add_argument("directory", help="a directory, or a checkpoint's prefix or one of its files")
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check every checksum of a checkpoint (index, tensors, data file sizes) without restoring it",
    )
    p.add_argument("path", help=what)
    p.add_argument("--all", action="store_true", help="for a directory: verify every checkpoint in it")
    p = sub.add_parser(
        "diff",
        parents=[common],
        help="list the tensors that differ between two checkpoints (exit 0: same, 1: differ, 2: error)",
    )
    p.add_argument("a", help=what)
    p.add_argument("b", help=what)
    p.add_argument("--values", action="store_true", help="compare values too (max abs difference)")
    p = sub.add_parser(
        "gc",
        parents=[common],
        help="delete leftovers of failed saves: data files with no index, "
        "temp files, unfinished S3 uploads (run when no job is saving there)",
    )
    p.add_argument("directory")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p = sub.add_parser(
        "scavenge",
        parents=[common],
        help="under mpiexec on the job's nodes: copy the newest fast-tier checkpoint to the durable "
        "directory if it is newer than the newest there (exit 0 when there is nothing to do)",
    )
    p.add_argument("local_directory", help="the manager's local_directory, {node} and all")
    p.add_argument("durable_directory", help="the manager's directory")
    p.add_argument("--name", default="ckpt", help="the manager's checkpoint_name (default: ckpt)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the other ranks")
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
    reader = CheckpointReader(checkpoint_prefix(args.path, options), storage_options=options)
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


def _checkpoints(files: list[tuple[storage.Location, dict]]) -> list[dict]:
    """The committed checkpoints among ``files`` (one listing of a directory), oldest first."""
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


def human_size(n: int) -> str:
    """``1.5 MiB``: binary units, one decimal (bytes as they are)."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _listed_directory(path: str, options) -> tuple[storage.Location, list] | None:
    """``(directory, its listing)`` if ``path`` is a directory; None if it names a
    checkpoint (its prefix or one of its files) instead. NotFoundError if neither."""
    loc = storage.resolve(path, options)
    if loc.is_local and os.path.isdir(loc.path):
        return loc, storage.scan(loc)
    if file_checkpoint(path, options) is not None:
        return None
    if loc.is_local:
        problem = "not a directory or checkpoint" if os.path.exists(loc.path) else "no such directory"
        raise NotFoundError(f"{path}: {problem}")
    files = storage.scan(loc)
    if not files:
        raise NotFoundError(f"{path}: no such directory or checkpoint (nothing is stored under it)")
    return loc, files


def cmd_ls(args, options) -> None:
    listed = _listed_directory(args.directory, options)
    if listed is None:
        _ls_checkpoint(file_checkpoint(args.directory, options), options)
        return
    loc, files = listed
    ckpts = _checkpoints(files)
    state = get_checkpoint_state(args.directory, storage_options=options)
    latest = os.path.basename(state.model_checkpoint_path) if state else None
    if not ckpts:
        print(f"no checkpoints in {args.directory}")
        return
    print(f"{'checkpoint':<32} {'step':>8} {'size':>10}  time")
    for c in ckpts:
        when = datetime.datetime.fromtimestamp(c["mtime"]).isoformat(sep=" ", timespec="seconds")
        mark = "  (latest)" if c["prefix"] == latest else ""
        step = "-" if c["step"] is None else str(c["step"])
        print(f"{c['prefix']:<32} {step:>8} {human_size(c['bytes']):>10}  {when}{mark}")


def _ls_checkpoint(prefix: str, options) -> None:
    """One checkpoint's files, each with its size, and their total."""
    loc = storage.resolve(prefix, options)
    files = [(f, i) for f, i in storage.scan(loc.parent) if f.name == names.index_name(loc.name)]
    files += storage.data_files(loc.parent, loc.name)
    print(f"checkpoint: {prefix}")
    for f, i in files:
        print(f"  {f.name:<40} {human_size(i['size']):>10}")
    total = sum(i["size"] for _, i in files)
    print(f"  {len(files)} file(s), {human_size(total)}")


def _to_verify(path: str, every: bool, options) -> list[str]:
    """The prefixes ``verify PATH`` checks: the checkpoint PATH names, or for a directory
    its latest (by the state file, else the newest listed) or, with ``every``, all."""
    listed = _listed_directory(path, options)
    if listed is None:
        return [checkpoint_prefix(path, options)]
    loc, files = listed
    ckpts = [loc.child(c["prefix"]).url for c in _checkpoints(files)]
    if not ckpts:
        raise NotFoundError(f"no checkpoints in {path}")
    if every:
        return ckpts
    try:
        return [checkpoint_prefix(path, options)]
    except NotFoundError:  # no state file (or it names none that exists): the newest listed
        return ckpts[-1:]


_MAX_DAMAGE_LINES = 50


def cmd_verify(args, options) -> int:
    bad = 0
    for prefix in _to_verify(args.path, args.all, options):
        with Progress(prefix) as bar:
            report = verify_checkpoint(storage.resolve(prefix, options), bar.update)
        if report.ok:
            print(
                f"OK {report.prefix}: {report.tensors} tensor(s), {report.files} data file(s), "
                f"{human_size(report.bytes_checked)} checked in {report.seconds:.1f} s"
            )
            continue
        bad += 1
        _print_damage(report)
    return 1 if bad else 0


def _print_damage(report: Report) -> None:
    for line in report.damage[:_MAX_DAMAGE_LINES]:
        print(f"shardsave verify: damaged: {line}", file=sys.stderr)
    if len(report.damage) > _MAX_DAMAGE_LINES:
        print(f"shardsave verify: ... and {len(report.damage) - _MAX_DAMAGE_LINES} more", file=sys.stderr)
    names_ = sorted(report.damaged_tensors)
    shown = ", ".join(map(repr, names_[:10])) + (", ..." if len(names_) > 10 else "")
    print(
        f"shardsave verify: {report.prefix} is DAMAGED: {len(report.damage)} problem(s), "
        f"{len(names_)} of {report.tensors} tensor(s) damaged" + (f": {shown}" if names_ else ""),
        file=sys.stderr,
    )


class Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal (never in logs)."""

    def __init__(self, label: str):
        self.label = label
        self.shown = sys.stderr.isatty()
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.shown or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\r{self.label[-40:]} [{bar:<30}] {100 * frac:5.1f}% {human_size(done)}/{human_size(total)}"
        )
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.shown and self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_scavenge(args, options) -> None:
    from .tiers.scavenge import scavenge

    def report(step: int | None) -> None:
        where = f"{args.durable_directory}/{args.name}-{step}"
        print(
            f"shardsave scavenge: copied step {step} to {where}"
            if step is not None
            else "shardsave scavenge: nothing to do"
        )

    with Progress(f"scavenging {args.local_directory}") as bar:
        scavenge(
            args.local_directory,
            args.durable_directory,
            checkpoint_name=args.name,
            storage_options=options,
            timeout=args.timeout,
            progress=bar.update,
            report=report,
        )


def cmd_diff(args, options) -> int:
    a = CheckpointReader(checkpoint_prefix(args.a, options), storage_options=options)
    b = CheckpointReader(checkpoint_prefix(args.b, options), storage_options=options)
    count = 0
    for line in differences(a, b, values=args.values):
        print(line, flush=True)
        count += 1
    if count:
        print(f"{count} difference(s) between A {a.prefix} and B {b.prefix}")
    return 1 if count else 0


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
        commands = {
            "inspect": cmd_inspect,
            "ls": cmd_ls,
            "gc": cmd_gc,
            "verify": cmd_verify,
            "diff": cmd_diff,
            "scavenge": cmd_scavenge,
        }
        return commands[args.command](args, options) or 0
    except (ShardsaveError, OSError) as exc:  # OSError: a backend's, should one escape
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"shardsave {args.command}: error: {message}", file=sys.stderr)
        return 2 if args.command == "diff" else 1
    except Exception as exc:  # a bug, not the user's: still no traceback unless asked for one
        if os.environ.get("SHARDSAVE_TRACEBACK"):
            raise
        print(
            f"shardsave {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(a bug in shardsave: please report it; SHARDSAVE_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2 if args.command == "diff" else 1
    except KeyboardInterrupt:
        print(f"shardsave {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
