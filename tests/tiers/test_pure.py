"""The fast tier's pure parts: topology, XOR parity and rebuild, the manifest as hostile
input, file names, and where a restart finds each file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsave.errors import DataLossError, FailedPreconditionError
from shardsave.format.crc import crc32c
from shardsave.tiers import files, sources, xor
from shardsave.tiers.manifest import Manifest, chunk_size, parse
from shardsave.tiers.topology import Topology


def topo(*counts: int) -> Topology:
    return Topology(tuple(f"n{i}" for i, c in enumerate(counts) for _ in range(c)))


def test_partners_are_on_the_next_node_and_every_rank_has_one():
    t = topo(2, 2, 3)
    for r in range(t.size):
        p = t.partner_of(r)
        assert t.nodes[p] != t.nodes[r]
    assert sorted(s for r in range(t.size) for s in t.partner_senders(r)) == list(range(t.size))


def test_xor_sets_span_the_nodes_of_a_group_and_the_remainder_joins_the_last():
    t = topo(1, 1, 1, 1, 1)
    assert t.node_groups(2) == (("n0", "n1"), ("n2", "n3", "n4"))
    for s in t.xor_sets(2):
        assert len({t.nodes[r] for r in s}) == len(s)
    with pytest.raises(FailedPreconditionError, match="at least 4 nodes"):
        topo(2, 2).check("xor", 4)
    with pytest.raises(FailedPreconditionError, match="at least 2 nodes"):
        topo(4).check("partner", 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=2, max_size=6), st.data())
def test_any_one_member_is_rebuilt_exactly_from_the_others_and_their_parity(sizes, data):
    rng = np.random.default_rng(len(sizes))
    datas = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    c = chunk_size(sizes)
    parities = xor.parity(datas, c)
    m = Manifest(
        0,
        "ckpt",
        ("a",) * len(sizes),
        tuple(sizes),
        "xor",
        0,
        0,
        0.0,
        None,
        (tuple(range(len(sizes))),),
        (c,),
    )
    lost = data.draw(st.integers(0, len(sizes) - 1))

    def read(kind, rank):
        assert rank != lost
        return datas[rank] if kind == "data" else parities[rank].tobytes()

    assert xor.rebuild(m, lost, read) == datas[lost]


def _manifest(**kw) -> Manifest:
    base = dict(
        step=7,
        checkpoint_name="ckpt",
        nodes=("a", "a", "b", "b"),
        sizes=(10, 20, 30, 40),
        redundancy="partner",
        index_size=100,
        index_crc=5,
        timestamp=1.5,
        partners=(2, 3, 0, 1),
    )
    return Manifest(**{**base, **kw})


def test_a_manifest_round_trips_and_its_checksum_guards_every_field():
    m = _manifest()
    assert parse(m.encode(), "m") == m
    outer = json.loads(m.encode())
    outer["body"]["sizes"][0] = 11  # a plausible change, caught by the checksum
    with pytest.raises(DataLossError, match="checksum"):
        parse(json.dumps(outer).encode(), "m")


def _resealed(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"body": body, "crc32c": crc32c(text)}).encode()


@pytest.mark.parametrize(
    "change",
    [
        {"sizes": [10, 20, 30]},
        {"sizes": [10, 20, 30, -1]},
        {"partners": [0, 3, 0, 1]},  # a rank its own partner
        {"partners": [2, 3, 0, 9]},
        {"nodes": ["a", "a", "b", "../x"]},
        {"step": -1},
        {"redundancy": "raid"},
        {"index_size": 1.5},
        {"timestamp": float("nan")},
    ],
)
def test_a_resealed_manifest_with_impossible_fields_is_data_loss(change):
    body = json.loads(_manifest().encode())["body"]
    body.update(change)
    with pytest.raises(DataLossError, match="not a valid fast-tier manifest"):
        parse(_resealed(body), "m")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400) | st.from_regex(rb"\{.*\}", fullmatch=True))
def test_arbitrary_bytes_are_a_manifest_or_data_loss(data):
    assert _manifest_or_none(data) is None  # never a bare exception; random bytes never pass the CRC


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_manifests_are_a_manifest_or_data_loss(data):
    raw = bytearray(_manifest().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    found = _manifest_or_none(bytes(raw))
    assert found is None or isinstance(found, Manifest)  # a byte that changed nothing of the body


def _manifest_or_none(data: bytes) -> Manifest | None:
    try:
        return parse(data, "fuzz")
    except DataLossError as exc:
        assert "fuzz is not a valid fast-tier manifest" in str(exc)
        return None


def test_file_names_parse_back_and_strangers_do_not():
    name = files.file("ckpt", 12, "partner", 3, 8)
    assert name == "ckpt-12.partner-00003-of-00008"
    assert files.parse("ckpt", name) == (12, "partner", 3, 8)
    assert files.parse("ckpt", "ckpt-12.index") == (12, "index", None, None)
    for stranger in ("ckpt-12.data-00009-of-00008", "other-1.index", "ckpt-1.index.tmp1a2b", "ckpt-x.index"):
        assert files.parse("ckpt", stranger) is None
    assert files.local_directory("/dev/shm/{node}/run", "n3") == "/dev/shm/n3/run"


def _held(m: Manifest, drop_nodes=(), extra=None) -> sources.Held:
    held: sources.Held = {}
    for r, node in enumerate(m.nodes):
        mine = held.setdefault(node, {})
        mine[files.file("ckpt", m.step, "data", r, m.nranks)] = m.sizes[r]
        mine[files.index("ckpt", m.step)] = m.index_size
        if m.partners:
            theirs = held.setdefault(m.nodes[m.partners[r]], {})
            theirs[files.file("ckpt", m.step, "partner", r, m.nranks)] = m.sizes[r]
    for node in drop_nodes:
        held.pop(node, None)
    return held


def test_sources_prefer_data_then_partner_and_say_why_when_neither():
    m = _manifest()
    t = Topology(m.nodes)
    plan = sources.plan(m, _held(m), t)
    assert [f.kind for f in plan.files] == ["data"] * 4
    plan = sources.plan(m, _held(m, drop_nodes=["b"]), t)
    assert [(f.kind, f.node) for f in plan.files] == [("data", "a")] * 2 + [("partner", "a")] * 2
    held = _held(m, drop_nodes=["b"])
    held["a"]["ckpt-7.partner-00002-of-00004"] = 29  # the wrong size: not a copy
    plan = sources.plan(m, held, t)
    assert plan.files is None and "rank 2" in plan.reason and "partner copy" in plan.reason
    assert sources.plan(m, {}, t).reason == "no node holds the index of step 7"
    bare = _manifest(redundancy="none", partners=None)
    plan = sources.plan(bare, _held(bare, drop_nodes=["a"]), t)
    assert plan.files is None and "saved without redundancy" in plan.reason


def test_a_served_file_is_only_a_fast_tier_name_and_ranges_inside_it(tmp_path):
    from shardsave._comm import Comm
    from shardsave._comm.serving import FileServer
    from shardsave.errors import NotFoundError, PermissionDeniedError
    from shardsave.tiers import restart, view

    class Tier:  # what server_of reads of a FastTier
        checkpoint_name = "ckpt"
        location = __import__("shardsave").storage.resolve(str(tmp_path))

    (tmp_path / "ckpt-1.data-00000-of-00001").write_bytes(b"0123456789")
    (tmp_path / "secret").write_bytes(b"no")
    server = FileServer(Comm(None), restart.server_of(Tier), "test")
    buf = bytearray(4)
    server.fetch(0, "ckpt-1.data-00000-of-00001", [(3, memoryview(buf))])
    assert bytes(buf) == b"3456"
    for name in ("secret", "../secret", "ckpt-1.data-00001-of-00001"):
        with pytest.raises(NotFoundError):
            server.fetch(0, name, [(0, memoryview(bytearray(1)))])
    with pytest.raises(DataLossError, match="outside it"):
        server.fetch(0, "ckpt-1.data-00000-of-00001", [(8, memoryview(bytearray(4)))])
    the_view = view.View("v", {"ckpt-1.index": view.Source(3, data=b"abc")}, server)
    loc = view.location(the_view, "ckpt-1.index")
    assert loc.backend.read(loc, None) == b"abc"
    with pytest.raises(DataLossError, match="too short"):
        the_view.read_into("ckpt-1.index", [(2, memoryview(bytearray(2)))])
    with pytest.raises(PermissionDeniedError, match="read-only"):
        loc.backend.publish(loc, b"x", False, False)


@pytest.mark.parametrize("sets", [[[0, 1, 2, "x"]], [[0, [1]], [2, 3]], [[0, None], [2, 3]]])
def test_a_resealed_xor_manifest_with_strange_members_is_data_loss_not_a_crash(sets):
    body = json.loads(
        _manifest(redundancy="xor", partners=None, sets=((0, 2), (1, 3)), chunks=(30, 40)).encode()
    )["body"]
    body["sets"] = sets
    with pytest.raises(DataLossError, match="not a valid fast-tier manifest"):
        parse(_resealed(body), "m")


def test_a_manifest_claiming_a_huge_index_is_not_believed():
    body = json.loads(_manifest().encode())["body"]
    body["index_size"] = 1 << 40
    with pytest.raises(DataLossError, match="index_size"):
        parse(_resealed(body), "m")
