"""The commit protocol: a save replaces the checkpoint at its prefix with never a moment in
which neither the old nor the new one is restorable, and ``recover`` finishes or undoes
what an interrupted save left.

Names, for a prefix ``P`` saved by ``N`` ranks under the save id ``ID`` (16 hex digits the
coordinator draws for each save):

    P.data-<r>-of-<N>.<ID>.staged    rank r's data file while the save is in flight
    P.index.<ID>.pending             the journal: the new index, written once every
                                     staged file is checked
    P.index, P.data-<r>-of-<N>       the checkpoint

A save (save/protocol.py, steps 3 to 5):

1. :func:`prepare`, on the coordinator: :func:`recover` ``P``, draw the id, and choose how
   the ranks write. *Staged* (the names above) locally, always: renames cost nothing
   there. Elsewhere staged when ``P`` already has files, and *direct* for a fresh prefix:
   the final names, then a create-only index PUT, since a rename on S3 is a copy.
2. Every rank writes its data file (fsynced) and reports its size, and on S3 its ETag.
3. :func:`commit`, on the coordinator, from one listing of the directory: every rank's
   file is there with the reported size (and ETag), and no other save of ``P`` has files
   in the directory; otherwise it raises, and a staged save deletes its files. Then, staged:
   publish the journal atomically (temp file, fsync, rename, fsync of the directory; one
   PUT elsewhere): **the commit point**. Then roll forward: rename every staged file to
   its final name (S3: server-side copies in parallel, then one delete), rename the
   journal to ``P.index`` (an atomic replace), fsync the directory. Direct: fsync the
   directory, publish ``P.index`` create-only: the commit point. Last, delete data files
   of ``P`` written by another number of ranks.

Before the journal exists the old checkpoint is untouched (staged files have names no
index knows); once it exists the new checkpoint is complete in the journal and the staged
or already renamed files. Between the first rename and the last, ``P.index`` is old and
some data files are new: that window is closed by :func:`recover`, which the coordinator
runs at the start of every save and restore of ``P``, and ``shardsave gc`` for every
prefix of a directory: a journal is rolled forward (every file it names is staged or in
place), and staged files and journals of other saves are deleted (rolled back). A restore
only rolls forward: it must not delete the files of a save another job is running.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from dataclasses import dataclass, field

from .. import storage
from ..errors import AbortedError, DataLossError, FailedPreconditionError
from ..format import names
from ..format.coding import DecodeError
from ..format.index import parse_index
from ..format.names import data_file_name


@dataclass(frozen=True)
class SaveMode:
    """What the coordinator decided for one save; every rank gets a copy."""

    save_id: str
    staged: bool
    index_version: tuple | None = None  # of P.index when the save began (None: no index)

    def data_path(self, prefix_path: str, rank: int, nranks: int) -> str:
        """Where rank ``rank`` writes its data file."""
        final = data_file_name(prefix_path, rank, nranks)
        return names.staged_name(final, self.save_id) if self.staged else final


def is_staged_name(name: str) -> bool:
    return names.parse_staged_name(name) is not None


@dataclass
class _Files:
    """The files of one prefix (its base name ``base``) in a listing of its directory,
    matched by exact name (the prefix is literal, never a pattern)."""

    base: str
    index: bool = False
    data: list[str] = field(default_factory=list)  # final data files, any number of ranks
    staged: dict[str, list[str]] = field(default_factory=dict)  # save id -> staged data files
    journals: dict[str, dict] = field(default_factory=dict)  # save id -> listing entry
    temps: list[str] = field(default_factory=list)  # journal temp files of interrupted publishes

    @classmethod
    def of(cls, base: str, listing: dict[str, dict]) -> _Files:
        files = cls(base)
        files.index = names.index_name(base) in listing
        for name in listing:
            if not name.startswith(base + "."):
                continue
            if (staged := names.parse_staged_name(name)) and staged[1] == base:
                files.staged.setdefault(staged[2], []).append(name)
            elif (journal := names.parse_journal_name(name)) and journal[0] == base:
                files.journals[journal[1]] = listing[name]
            elif (temp := names.parse_journal_temp_name(name)) and temp[0] == base:
                files.temps.append(name)
            elif names.is_data_file_of(name, base):
                files.data.append(name)
        return files

    def newest_journal(self) -> str | None:
        if not self.journals:
            return None
        return max(self.journals, key=lambda i: (self.journals[i].get("mtime") or 0.0, i))

    def others(self, save_id: str) -> list[str]:
        """Files of saves other than ``save_id`` in flight (staged files, journals, temps)."""
        out = [n for i, names in self.staged.items() if i != save_id for n in names]
        out += [names.journal_name(self.base, i) for i in self.journals if i != save_id]
        return out + self.temps


def _final_of(staged_name: str) -> str:
    return names.parse_staged_name(staged_name)[0]


# ------------------------------------------------------------------------------ save
def prepare(loc: storage.Location, fsync: bool = True) -> SaveMode:
    """Coordinator, before any rank writes: the directory exists, an interrupted save of
    ``loc`` is finished or undone, and the new save's id and way of writing are chosen."""
    storage.makedirs(loc.parent)
    listing = storage.files_in(loc.parent)
    files = _Files.of(loc.name, listing)
    apply(plan(loc, listing), fsync)
    existing = files.index or bool(files.data or files.staged or files.journals)
    index = (
        storage.files_in(loc.parent).get(names.index_name(loc.name))
        if files.journals
        else listing.get(names.index_name(loc.name))
    )
    return SaveMode(
        uuid.uuid4().hex[:16],
        staged=loc.is_local or existing,
        index_version=None if index is None else index["version"],
    )


def commit(
    loc: storage.Location,
    mode: SaveMode,
    reports: list[tuple[int, str | None]],
    index: bytes,
    what: str,
    fsync: bool = True,
) -> None:
    """Coordinator: check what the ranks wrote (``reports``: each rank's bytes and ETag),
    then make ``index`` the checkpoint at ``loc`` (the module docstring has the steps)."""
    nranks = len(reports)
    directory = loc.parent
    journal = directory.child(names.journal_name(loc.name, mode.save_id))
    staged = [mode.data_path(loc.name, r, nranks) for r in range(nranks)]
    try:
        files = storage.files_in(directory)  # one listing, not one request per rank
        index_now = files.get(names.index_name(loc.name))
        if (None if index_now is None else index_now["version"]) != mode.index_version:
            raise _another_save(
                loc,
                what,
                f"{names.index_name(loc.url)} changed while this save was running; nothing was committed",
            )
        others = _Files.of(loc.name, files).others(mode.save_id)
        if others:
            raise _another_save(loc, what, f"{directory.child(others[0]).url} is not this save's")
        _check_written(loc, mode, reports, files, what)
        if not mode.staged:
            if fsync:  # the data files reach the disk before the index that names them
                storage.fsync_dir(directory)
            _publish_index_create_only(loc, index, what, fsync)
        else:
            storage.publish(journal, index, fsync=fsync, exclusive=True)
    except BaseException:
        if mode.staged:  # once no journal names them they go, and the old checkpoint stays
            with contextlib.suppress(Exception):
                storage.remove([journal])  # a PUT that failed may still have landed
                storage.remove([directory.child(n) for n in staged])
        raise
    if mode.staged:
        moved_by_others = _roll_forward(loc, mode.save_id, staged, fsync)
        _check_moved(loc, moved_by_others, files, what)
    current = {data_file_name(loc.name, r, nranks) for r in range(nranks)}
    storage.remove([directory.child(n) for n in _Files.of(loc.name, files).data if n not in current])


def _check_written(loc, mode: SaveMode, reports, files: dict[str, dict], what: str) -> None:
    """Every rank's data file is in the listing with the size (and ETag) it reported."""
    nranks = len(reports)
    for rank, (written, etag) in enumerate(reports):
        name = mode.data_path(loc.name, rank, nranks)
        found = files.get(name)
        url = loc.parent.child(name).url
        if found is not None and found["size"] == written and (etag is None or found["etag"] in (None, etag)):
            continue
        if found is not None and etag is not None and found["etag"] not in (None, etag):
            raise _another_save(loc, what, f"{url} is not the file rank {rank} wrote (its ETag changed)")
        if rank == 0 or (found is not None and mode.staged):
            # the coordinator's own file, or a name only this save uses: someone else's doing
            detail = "is gone" if found is None else f"has {found['size']} bytes, not {written}"
            raise _another_save(loc, what, f"{url}, written by rank {rank}, {detail}")
        seen = "no file" if found is None else f"{found['size']} bytes"
        raise DataLossError(
            f"{url}: rank {rank} wrote {written} bytes but the coordinator sees {seen}; do all ranks write to the "
            "same shared filesystem? (node-local disks and memory:// cannot hold a "
            "multi-process checkpoint)"
        )


def _another_save(loc: storage.Location, what: str, detail: str) -> AbortedError:
    return AbortedError(
        f"{what}: another save is writing {loc.url} at the same time (two jobs saving into one "
        f"directory?): {detail}"
    )


def _publish_index_create_only(loc: storage.Location, index: bytes, what: str, fsync: bool) -> None:
    try:
        storage.publish(loc.with_path(names.index_name(loc.path)), index, fsync=fsync, exclusive=True)
    except FailedPreconditionError as exc:
        raise _another_save(
            loc, what, f"{names.index_name(loc.url)} appeared while this save was running"
        ) from exc


def _roll_forward(loc: storage.Location, save_id: str, staged: list[str], fsync: bool) -> list[str]:
    """Rename the staged files, then the journal, to their final names. Idempotent: a
    file already moved (by an earlier, interrupted run of this, or by another process
    finishing the same journal) is skipped. Returns the staged files it did not find."""
    directory = loc.parent
    skipped = storage.rename_all([(directory.child(n), directory.child(_final_of(n))) for n in staged])
    storage.rename(
        directory.child(names.journal_name(loc.name, save_id)), loc.with_path(names.index_name(loc.path))
    )
    if fsync:
        storage.fsync_dir(directory)
    return [posixpath.basename(src.path) for src in skipped]


def _check_moved(loc: storage.Location, names: list[str], before: dict[str, dict], what: str) -> None:
    """Staged files that were gone when this save renamed them: fine if another process
    finishing the same journal moved them (the final file is the staged one: same inode
    locally, same size elsewhere), else another save deleted them after the checks."""
    if not names:
        return
    after = storage.files_in(loc.parent)
    for name in names:
        was, now = before[name], after.get(_final_of(name))
        same = now is not None and now["size"] == was["size"]
        if same and loc.is_local:
            same = now["version"][0] == was["version"][0]
        if not same:
            raise _another_save(
                loc,
                what,
                f"{loc.parent.child(name).url} vanished after the commit point; the checkpoint is damaged",
            )


# -------------------------------------------------------------------------- recovery
@dataclass
class Recovery:
    """What :func:`recover` does for one prefix: finish the save whose journal is
    ``journal`` (a save id) and delete ``doomed`` (files of saves rolled back, and data
    files of another number of ranks once the journal is rolled forward)."""

    prefix: storage.Location
    journal: str | None = None
    staged: list[str] = field(default_factory=list)  # the journal's staged files
    doomed: list[storage.Location] = field(default_factory=list)


def plan(loc: storage.Location, listing: dict[str, dict], roll_back: bool = True) -> Recovery:
    """What an interrupted save of ``loc`` left, and what to do about it (nothing is
    changed). ``listing``: :func:`storage.files_in` of its directory."""
    files = _Files.of(loc.name, listing)
    directory = loc.parent
    rec = Recovery(loc)
    journal = files.newest_journal()
    if journal is not None:
        nranks = _journal_shards(loc, journal)
        rec.journal = journal
        rec.staged = sorted(files.staged.get(journal, []))
        staged_finals = {_final_of(n) for n in rec.staged}
        wanted = [data_file_name(loc.name, r, nranks) for r in range(nranks)]
        missing = [n for n in wanted if n not in staged_finals and n not in files.data]
        missing = [n for n in missing if not _present_now(directory, n, journal)]
        if missing:
            raise DataLossError(
                f"cannot finish the interrupted save of {loc.url}: its journal "
                f"{directory.child(names.journal_name(loc.name, journal)).url} names "
                f"{directory.child(missing[0]).url}, which is neither staged nor in place"
            )
        rec.doomed += [directory.child(n) for n in files.data if n not in wanted]
    if roll_back:
        rec.doomed += [directory.child(n) for n in files.others(journal or "")]
    return rec


def _present_now(directory: storage.Location, final: str, save_id: str) -> bool:
    """Whether ``final`` is staged or in place now: a listing made while another process
    rolls the same journal forward may have seen a file under neither name."""
    staged = names.staged_name(final, save_id)
    return storage.exists(directory.child(staged)) or storage.exists(directory.child(final))


def _journal_shards(loc: storage.Location, save_id: str) -> int:
    journal = loc.parent.child(names.journal_name(loc.name, save_id))
    try:
        return parse_index(storage.read_bytes(journal)).header.num_shards
    except (DecodeError, ValueError, IndexError) as exc:
        raise DataLossError(f"{journal.url} is not a valid checkpoint index: {exc}") from exc


def apply(rec: Recovery, fsync: bool = True) -> None:
    if rec.journal is not None:
        _roll_forward(rec.prefix, rec.journal, rec.staged, fsync)
    storage.remove(rec.doomed)


def recover(loc: storage.Location, *, roll_back: bool = True, fsync: bool = True) -> Recovery:
    """Finish (roll forward) or undo (roll back, with ``roll_back``) what an interrupted
    save of ``loc`` left; one listing of its directory when there is nothing to do."""
    rec = plan(loc, storage.files_in(loc.parent), roll_back)
    apply(rec, fsync)
    return rec


def in_flight(listing: dict[str, dict]) -> set[str]:
    """Base names of the prefixes in ``listing`` that have staged files or journals."""
    bases = set()
    for name in listing:
        for parse in (names.parse_journal_name, names.parse_journal_temp_name):
            if journal := parse(name):
                bases.add(journal[0])
        if staged := names.parse_staged_name(name):
            bases.add(staged[1])
    return bases
