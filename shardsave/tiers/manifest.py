"""What a fast-tier checkpoint records beside its index (pure): who saved it on which
node, every data file's size, and how it is protected. Every node leader publishes the
same manifest just before its copy of the index.

It is input like any file: :func:`parse` checks every field (types, ranges, that the
partners and XOR sets fit the ranks and nodes) and a CRC32C of the body, and raises
:class:`DataLossError` naming the file for anything else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import DataLossError
from ..format.crc import crc32c
from .topology import NODE_ID, SCHEMES

FORMAT = "shardsave-fast-1"
MAX_BYTES = 64 << 20
"""A manifest is a few bytes per rank: anything larger is not one."""
MAX_RANKS = 1 << 20
MAX_FILE = (1 << 63) - 1
MAX_INDEX = 2 << 30
"""An index is read whole into memory on every rank: a manifest claiming more (a sparse
file on tmpfs costs nothing to make) is not believed."""


@dataclass(frozen=True)
class Manifest:
    step: int
    checkpoint_name: str
    nodes: tuple[str, ...]
    """The node id of each saving rank."""
    sizes: tuple[int, ...]
    """The size in bytes of each saving rank's data file."""
    redundancy: str
    index_size: int
    index_crc: int
    """CRC32C (unmasked) of the index bytes: a node's copy is checked before use."""
    timestamp: float
    partners: tuple[int, ...] | None = None
    """partner: ``partners[r]`` is the saving rank that stores ``r``'s partner copy."""
    sets: tuple[tuple[int, ...], ...] | None = None
    """xor: the XOR sets (topology.Topology.xor_sets), each in ascending rank order."""
    chunks: tuple[int, ...] | None = None
    """xor: the parity chunk size of each set (xor.py): its members' parity files' size."""

    @property
    def nranks(self) -> int:
        return len(self.nodes)

    def encode(self) -> bytes:
        body = {
            "format": FORMAT,
            "step": self.step,
            "checkpoint_name": self.checkpoint_name,
            "nodes": list(self.nodes),
            "sizes": list(self.sizes),
            "redundancy": self.redundancy,
            "index_size": self.index_size,
            "index_crc": self.index_crc,
            "timestamp": self.timestamp,
            "partners": None if self.partners is None else list(self.partners),
            "sets": None if self.sets is None else [list(s) for s in self.sets],
            "chunks": None if self.chunks is None else list(self.chunks),
        }
        text = _canonical(body)
        return json.dumps({"body": body, "crc32c": crc32c(text)}, separators=(",", ":")).encode()


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse(data: bytes, where: str) -> Manifest:
    """The manifest in ``data`` (read from ``where``, for messages), checked."""

    def bad(why: str) -> DataLossError:
        return DataLossError(f"{where} is not a valid fast-tier manifest: {why}")

    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_BYTES:
        raise bad(f"more than {MAX_BYTES} bytes")
    try:
        outer = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({exc.__class__.__name__})") from None
    if not isinstance(outer, dict) or set(outer) != {"body", "crc32c"} or not isinstance(outer["body"], dict):
        raise bad("not a manifest object")
    body = outer["body"]
    try:
        text = _canonical(body)
    except (TypeError, ValueError, RecursionError):
        raise bad("not a manifest object") from None
    if not _int(outer["crc32c"], 0, 0xFFFFFFFF) or crc32c(text) != outer["crc32c"]:
        raise bad("its checksum does not match its contents")
    expected = {
        "format",
        "step",
        "checkpoint_name",
        "nodes",
        "sizes",
        "redundancy",
        "index_size",
        "index_crc",
        "timestamp",
        "partners",
        "sets",
        "chunks",
    }
    if set(body) != expected:
        raise bad(f"fields {sorted(set(body) ^ expected)} missing or unexpected")
    if body["format"] != FORMAT:
        raise bad(f"format {body['format']!r}, expected {FORMAT!r}")
    if not _int(body["step"], 0, MAX_FILE):
        raise bad(f"step {body['step']!r}")
    name = body["checkpoint_name"]
    if not isinstance(name, str) or not name or "/" in name or "\x00" in name:
        raise bad(f"checkpoint_name {name!r}")
    nodes = body["nodes"]
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_RANKS:
        raise bad("nodes is not a list of 1 to 2**20 node ids")
    if not all(isinstance(n, str) and NODE_ID.fullmatch(n) for n in nodes):
        raise bad("a node id is not a plain name")
    n = len(nodes)
    sizes = body["sizes"]
    if not isinstance(sizes, list) or len(sizes) != n or not all(_int(s, 0, MAX_FILE) for s in sizes):
        raise bad(f"sizes is not {n} file sizes")
    scheme = body["redundancy"]
    if scheme not in SCHEMES:
        raise bad(f"redundancy {scheme!r}")
    if not _int(body["index_size"], 0, MAX_INDEX) or not _int(body["index_crc"], 0, 0xFFFFFFFF):
        raise bad("index_size or index_crc")
    ts = body["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise bad(f"timestamp {ts!r}")
    partners = sets = chunks = None
    if scheme == "partner":
        partners = body["partners"]
        if (
            not isinstance(partners, list)
            or len(partners) != n
            or not all(_int(p, 0, n - 1) for p in partners)
        ):
            raise bad("partners is not a rank per rank")
        if any(nodes[p] == nodes[r] for r, p in enumerate(partners)):
            raise bad("a partner copy is on its own node")
        partners = tuple(partners)
    elif body["partners"] is not None:
        raise bad("partners given without redundancy 'partner'")
    if scheme == "xor":
        sets, chunks = body["sets"], body["chunks"]
        if not isinstance(sets, list) or not all(isinstance(s, list) and len(s) >= 2 for s in sets):
            raise bad("sets is not a list of sets of at least 2 ranks")
        flat = [r for s in sets for r in s]
        if not all(_int(r, 0, n - 1) for r in flat) or sorted(flat) != list(range(n)):
            raise bad("the XOR sets do not hold every rank exactly once")
        if any(s != sorted(s) or len({nodes[r] for r in s}) != len(s) for s in sets):
            raise bad("an XOR set is not in rank order or has two ranks on one node")
        if not isinstance(chunks, list) or len(chunks) != len(sets):
            raise bad("chunks is not one size per set")
        for s, c in zip(sets, chunks, strict=True):
            if not _int(c, 0, MAX_FILE) or c != chunk_size([sizes[r] for r in s]):
                raise bad(f"chunk size {c!r} does not fit the set {s}")
        sets, chunks = tuple(tuple(s) for s in sets), tuple(chunks)
    elif body["sets"] is not None or body["chunks"] is not None:
        raise bad("sets or chunks given without redundancy 'xor'")
    return Manifest(
        step=body["step"],
        checkpoint_name=name,
        nodes=tuple(nodes),
        sizes=tuple(sizes),
        redundancy=scheme,
        index_size=body["index_size"],
        index_crc=body["index_crc"],
        timestamp=float(ts),
        partners=partners,
        sets=sets,
        chunks=chunks,
    )


def chunk_size(sizes: list[int]) -> int:
    """The parity chunk of an XOR set whose members' files have ``sizes``: each member's
    file, padded with zeros, is cut into ``len(sizes) - 1`` chunks of this size."""
    return -(-max(sizes, default=0) // (len(sizes) - 1))


def _int(x: object, low: int, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high
