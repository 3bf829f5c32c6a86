"""The column-wise metadata of a save (``save/protocol._plain_metas``) is the per-variable
loop's, and every case the loop must explain still reaches it."""

from __future__ import annotations

import numpy as np
import pytest

import shardsave as ss
from shardsave.save import protocol
from shardsave.save.layout import SaveLayout


def layout_of(variables) -> SaveLayout:
    return SaveLayout({v.name: [v] for v in variables})


def loop_metas(layout: SaveLayout, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(protocol, "_plain_metas", lambda layout, arrays: None)
        return protocol.local_arrays(layout, "p")[1]


def test_column_wise_metas_are_the_loops(monkeypatch):
    variables = [
        ss.Variable("f", np.arange(6, dtype=np.float32).reshape(2, 3), register=False),
        ss.Variable("i", np.arange(4, dtype=np.int64), register=False),
        ss.Variable("s", np.float64(3.5), register=False),
        ss.Variable("e", np.zeros((0, 3), np.float16), register=False),
        ss.Variable("part", np.ones((2, 4), np.int32), global_shape=(6, 4), offset=(2, 0), register=False),
    ]
    fast = protocol.local_arrays(layout_of(variables), "p")[1]
    assert fast == loop_metas(layout_of(variables), monkeypatch)
    assert [m.nbytes for m in fast] == [24, 32, 8, 0, 32]


def test_strings_and_uninitialized_variables_go_through_the_loop():
    strings = ss.Variable("s", np.array([b"a", b"bc"], object), register=False)
    bad = ss.Variable("bad", np.array([b"a", 3], object), register=False)
    with pytest.raises(ss.InvalidArgumentError, match="element 1 is int"):
        protocol.local_arrays(layout_of([strings, bad]), "p")
    assert protocol.local_arrays(layout_of([strings]), "p")[1][0].nbytes == 5
    empty = ss.Variable("u", dtype=np.float32, shape=(3,), register=False)
    with pytest.raises(ss.FailedPreconditionError, match="'u' is not initialized"):
        protocol.local_arrays(layout_of([empty]), "p")
