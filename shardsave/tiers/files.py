"""The fast tier's file names (pure). One node's local directory holds, for each step:

- ``<name>-<step>.index``: the checkpoint's index (every node has a copy; published last,
  after the manifest: it is the fast-tier commit point on that node);
- ``<name>-<step>.manifest``: the manifest (manifest.py), published just before the index;
- ``<name>-<step>.data-<r>-of-<n>``: the data file of saving rank ``r`` (on ``r``'s node);
- ``<name>-<step>.partner-<r>-of-<n>``: the partner copy of ``r``'s data file (partner);
- ``<name>-<step>.parity-<r>-of-<n>``: the XOR parity chunk ``r`` holds for its set (xor).

A node's files of one step that include every data file are an ordinary checkpoint.
"""

from __future__ import annotations

import re

from ..format import names

KINDS = ("data", "partner", "parity")
_FILE = re.compile(
    r"(?P<name>.+)-(?P<step>[0-9]{1,19})\.(?P<kind>data|partner|parity)-(?P<r>[0-9]{5,})-of-(?P<n>[0-9]{5,})"
)
_META = re.compile(r"(?P<name>.+)-(?P<step>[0-9]{1,19})\.(?P<kind>index|manifest)")


def base(checkpoint_name: str, step: int) -> str:
    """``ckpt-7``: the base name of a step, in both tiers."""
    return f"{checkpoint_name}-{step}"


def index(checkpoint_name: str, step: int) -> str:
    return names.index_name(base(checkpoint_name, step))


def manifest(checkpoint_name: str, step: int) -> str:
    return base(checkpoint_name, step) + ".manifest"


def file(checkpoint_name: str, step: int, kind: str, rank: int, nranks: int) -> str:
    """The file of ``kind`` (data, partner, parity) of saving rank ``rank`` of ``nranks``."""
    if kind not in KINDS:
        raise ValueError(f"unknown fast-tier file kind {kind!r}")
    return f"{base(checkpoint_name, step)}.{kind}-{rank:05d}-of-{nranks:05d}"


def parse(checkpoint_name: str, name: str) -> tuple[int, str, int | None, int | None] | None:
    """``(step, kind, rank, nranks)`` of a fast-tier file name of ``checkpoint_name``
    (kind ``index`` and ``manifest`` have no rank: None), else None (temp files of an
    interrupted publish included: they are garbage)."""
    if m := _FILE.fullmatch(name):
        r, n = int(m["r"]), int(m["n"])
        if m["name"] != checkpoint_name or r >= n:
            return None
        return int(m["step"]), m["kind"], r, n
    if (m := _META.fullmatch(name)) and m["name"] == checkpoint_name:
        return int(m["step"]), m["kind"], None, None
    return None


def local_directory(template: str, node: str) -> str:
    """``local_directory`` with ``{node}`` replaced by the node id (the only placeholder:
    other braces are taken literally)."""
    return template.replace("{node}", node)
