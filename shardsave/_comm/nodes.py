"""Which node each rank is on (collective): ``SHARDSAVE_NODE_ID`` when it is set (on every
rank, or on none), else the host name shared by the ranks of
``Split_type(COMM_TYPE_SHARED)``, made a plain name. The fast tier (tiers/) and a save
with ``Saver(files_per_node=k)`` (save/gather.py) both group ranks by these ids.
"""

from __future__ import annotations

import os
import re
import weakref

from ..errors import InvalidArgumentError
from . import Comm, peers

ENV = "SHARDSAVE_NODE_ID"
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A node id is used in file paths (``{node}``): a plain name, at most 64 characters."""


def check_node_id(node: str, source: str = ENV) -> str:
    if not isinstance(node, str) or not NODE_ID.fullmatch(node):
        raise InvalidArgumentError(
            f"{source}={node!r} is not a node id: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes part of a directory name)"
        )
    return node


def node_ids(comm: Comm, what: str = "finding the nodes") -> tuple[str, ...]:
    """Collective: the node id of every rank, the same tuple on every rank (or the same
    error on every rank)."""

    def mine() -> str | None:
        given = os.environ.get(ENV)
        return None if given is None else check_node_id(given)

    given = comm.every_rank(what, mine)
    everyone = comm.allgather(given)
    unset = [r for r, g in enumerate(everyone) if g is None]
    if unset and len(unset) != len(everyone):
        comm.agree(_mixed(unset, len(everyone)), what)
    if not unset:
        return tuple(everyone)
    host = peers.host_of_node(comm)
    return tuple(comm.allgather(_plain(host)))


_KNOWN: weakref.WeakKeyDictionary[Comm, tuple[str, ...]] = weakref.WeakKeyDictionary()


def known_node_ids(comm: Comm, what: str = "finding the nodes") -> tuple[str, ...]:
    """``node_ids``, found once per communicator (collective the first time): a save with
    ``files_per_node`` and a restore sharing its index per node ask on every call."""
    found = _KNOWN.get(comm)
    if found is None:
        found = _KNOWN[comm] = node_ids(comm, what)
    return found


def _mixed(unset: list[int], size: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{ENV} is set on some ranks but not on ranks {unset[:8]}{'...' if len(unset) > 8 else ''} "
        f"(of {size}): set it on every rank or on none"
    )


def _plain(host: str) -> str:
    """A host name as a node id: other characters become '-', at most 64 characters."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "-", host)[:64].lstrip("._-")
    return plain or "node"
