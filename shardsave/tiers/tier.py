"""``FastTier``: the node-local tier a CheckpointManager saves to when given a
``local_directory``: its nodes, its directory on this rank's node, its options, and the
operations on one node's files (uncommit, publish, list, retention)."""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any

from .. import storage
from .._comm import Comm, peers
from ..errors import InvalidArgumentError
from . import files, nodes, redundancy
from .topology import SCHEMES, Topology

log = logging.getLogger("shardsave")
_TEMP = re.compile(r".+\.tmp[0-9a-f]+")
_STAGED = re.compile(r".+\.[0-9a-f]{16}\.staged")
_MARK = ".shardsave-node-"
"""A node leader's marker file in its directory (its content: this job's token)."""


class FastTier:
    """Collective construction on ``comm`` (the Saver's: redundancy runs on it)."""

    def __init__(
        self,
        comm: Comm,
        template: str,
        checkpoint_name: str,
        *,
        max_to_keep: int,
        scheme: str,
        group_size: int,
        fsync: bool = False,
        create: bool = True,
    ):
        self.template = template
        self.checkpoint_name = checkpoint_name
        self.max_to_keep = max_to_keep
        self.redundancy = scheme
        self.group_size = group_size
        self.fsync = fsync
        self.comm = comm
        self.create = create
        """False (scavenge): a node without the directory has nothing; nothing is made."""
        what = f"opening the fast tier {template}"
        self.topology: Topology = nodes.identify(comm, what)
        self.topology.check(scheme, group_size)  # pure: the same error on every rank
        self.node = self.topology.nodes[comm.rank]
        self.is_leader = self.topology.is_leader(comm.rank)
        self.location: storage.Location = comm.every_rank(what, self._open)
        token = comm.bcast(uuid.uuid4().hex if comm.is_coordinator else None)
        comm.every_rank(what, lambda: self._mark(token))
        comm.every_rank(what, lambda: self._check_own(token))
        self.groups = redundancy.Groups(comm, self.topology, group_size) if scheme == "xor" else None
        # the restart's file servers and the drains run beside the Saver's own steps
        self.serving = peers.duplicate(comm)
        self.drain_comm = peers.duplicate(comm)
        self.draining: dict[int, Any] = {}
        """Steps a drain is copying, and its handle (the coordinator's view): local
        retention keeps them while their drain runs."""
        self.last_protection: redundancy.Protection | None = None

    def _open(self) -> storage.Location:
        loc = storage.resolve(files.local_directory(self.template, self.node))
        if not loc.is_local:
            raise InvalidArgumentError(
                f"local_directory={self.template!r} is not on a local filesystem (it is {loc.backend.kind}); "
                "the fast tier is each node's own RAM disk or SSD, e.g. /dev/shm/run/{node}"
            )
        if self.create:
            storage.makedirs(loc)
        return loc

    def _mark(self, token: str) -> None:
        """Node leaders: say "this node's directory" in it, for :meth:`_check_own`."""
        if self.is_leader and (self.create or storage.exists(self.location)):
            storage.publish(self.location.child(_MARK + self.node), token.encode(), fsync=False)

    def _check_own(self, token: str) -> None:
        """A directory that another node of this job marked too is not node-local (no
        ``{node}`` in a path on one machine, or a shared filesystem): a lost node would
        lose every copy. Markers of earlier jobs have other tokens."""
        if not self.is_leader:
            return
        others = []
        for name in storage.files_in(self.location):
            if name.startswith(_MARK) and name != _MARK + self.node:
                data = storage.read_bytes(self.location.child(name), missing_ok=True, limit=64)
                if data == token.encode():
                    others.append(name[len(_MARK) :])
        if others:
            raise InvalidArgumentError(
                f"local_directory={self.template!r} is the same directory ({self.location.url}) on nodes "
                f"{', '.join(sorted([self.node, *others]))}: each node needs its own (put {{node}} in the "
                "path, or use a node-local filesystem)"
            )

    def close(self) -> None:
        if self.groups is not None:
            self.groups.close()
        self.serving.close()
        self.drain_comm.close()

    def data_name(self, step: int, rank: int, nranks: int) -> str:
        return files.file(self.checkpoint_name, step, "data", rank, nranks)

    # ------------------------------------------------------------ one node's files
    def listing(self) -> dict[int, dict[str, Any]]:
        """``{step: {file name: size}}`` of this checkpoint name in this node's directory."""
        out: dict[int, dict[str, Any]] = {}
        for name, info in storage.files_in(self.location).items():
            parsed = files.parse(self.checkpoint_name, name)
            if parsed is not None:
                out.setdefault(parsed[0], {})[name] = info["size"]
        return out

    def committed_steps(self, listing: dict[int, dict[str, Any]] | None = None) -> list[int]:
        """Steps whose index and manifest this node holds, oldest first (from ``listing``,
        a :meth:`listing` already taken, or a new one)."""
        name = self.checkpoint_name
        return sorted(
            step
            for step, held in (self.listing() if listing is None else listing).items()
            if files.index(name, step) in held and files.manifest(name, step) in held
        )

    def uncommit(self, step: int) -> None:
        """Before saving a step the tier does not hold (as far as the manager knows):
        whatever this node has of it (an interrupted save's leftovers, an older job's
        step) goes, its index and manifest first. A re-save uses :meth:`swap_in` instead."""
        if not self.is_leader:
            return
        held = self.listing().get(step, {})
        first = [files.index(self.checkpoint_name, step), files.manifest(self.checkpoint_name, step)]
        storage.remove([self.location.child(n) for n in first if n in held])
        storage.remove([self.location.child(n) for n in held if n not in first])

    def swap_in(self, step: int, suffix: str) -> None:
        """Node leaders, re-saving ``step``: its index and manifest go (the earlier save is
        no longer restorable), the files staged with ``suffix`` take the final names, the
        earlier save's other files go; :meth:`publish` follows."""
        if not self.is_leader:
            return
        held = set(storage.files_in(self.location))
        first = [files.index(self.checkpoint_name, step), files.manifest(self.checkpoint_name, step)]
        storage.remove([self.location.child(n) for n in first if n in held])
        staged = [n for n in held if n.endswith(suffix)]
        finals = {n[: -len(suffix)] for n in staged}
        storage.rename_all([(self.location.child(n), self.location.child(n[: -len(suffix)])) for n in staged])
        old = [n for n in held if (files.parse(self.checkpoint_name, n) or (None,))[0] == step]
        storage.remove([self.location.child(n) for n in old if n not in finals and n not in first])

    def publish(self, step: int, index: bytes, manifest: bytes) -> None:
        """Node leaders: the manifest, then the index (this node's commit point)."""
        if not self.is_leader:
            return
        storage.publish(self.location.child(files.manifest(self.checkpoint_name, step)), manifest, self.fsync)
        storage.publish(self.location.child(files.index(self.checkpoint_name, step)), index, self.fsync)

    def keep_after(self, step: int) -> list[int]:
        """The coordinator: the steps local retention keeps once ``step`` is committed.
        Later steps go (a resumed job saving an older step starts a new timeline, as the
        durable tier's retention does), unless a drain is copying them."""
        held = set(self.committed_steps())
        committed = {s for s in held if s < step} | {step}
        newest = sorted(committed)[-self.max_to_keep :]
        running = {s for s, handle in self.draining.items() if not handle.done()}
        return sorted(set(newest) | (running & held))

    def delete_all_but(self, keep: list[int]) -> None:
        """Node leaders: every file of this checkpoint name not of a kept step (leftovers of
        interrupted saves, and publish temp files, included)."""
        if not self.is_leader:
            return
        doomed = []
        for name in storage.files_in(self.location):
            parsed = files.parse(self.checkpoint_name, name)
            # a publish's temp file of one of this name's files (another checkpoint_name
            # that starts with this one, ckpt-b beside ckpt, keeps its own)
            temp = (
                not parsed
                and _TEMP.fullmatch(name)
                and files.parse(self.checkpoint_name, name.rsplit(".tmp", 1)[0])
            )
            staged = (  # a re-save's file never swapped in (that save failed)
                not parsed
                and _STAGED.fullmatch(name)
                and files.parse(self.checkpoint_name, name.rsplit(".", 2)[0])
            )
            stale = parsed[0] not in keep if parsed else bool(temp or staged)
            if stale:
                doomed.append(name)
        storage.remove([self.location.child(n) for n in doomed])
        for name in doomed:
            log.debug("fast tier %s: deleted %s", self.location.url, name)

    def saved(self, step: int, protection: redundancy.Protection) -> None:
        self.last_protection = protection


def check_options(
    local_directory: Any, local_max_to_keep: Any, redundancy_scheme: Any, group_size: Any, persist: Any
) -> None:
    """The manager's fast-tier arguments, checked before the tier's collective steps (the
    one place: Topology.check then only asks whether the nodes suffice)."""
    if local_directory is None:
        if redundancy_scheme != "none" or persist is not None:
            raise InvalidArgumentError(
                "redundancy and persist_interval_steps are options of the fast tier: pass local_directory too"
            )
        return
    if not isinstance(local_directory, str | os.PathLike):
        raise InvalidArgumentError(f"local_directory must be a path, not {local_directory!r}")
    if isinstance(local_max_to_keep, bool) or not isinstance(local_max_to_keep, int) or local_max_to_keep < 1:
        raise InvalidArgumentError(
            f"local_max_to_keep must be an int of at least 1, not {local_max_to_keep!r}"
        )
    if redundancy_scheme not in SCHEMES:
        raise InvalidArgumentError(
            f"redundancy must be one of {', '.join(SCHEMES)}, not {redundancy_scheme!r}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise InvalidArgumentError(f"redundancy_group_size must be an int of at least 2, not {group_size!r}")
    if persist is not None and (isinstance(persist, bool) or not isinstance(persist, int) or persist < 1):
        raise InvalidArgumentError(
            f"persist_interval_steps must be None or an int of at least 1, not {persist!r}"
        )
