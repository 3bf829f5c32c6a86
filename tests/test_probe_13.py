"""A hostile new user's probes of issue 13 (manager, trees, metadata): each test pins a bug
found and fixed, so that it stays fixed."""

from __future__ import annotations

import numpy as np
import pytest
from crafting import Crafted

import shardsave as ss
from shardsave.format.names import METADATA_NAME


def _with_metadata_bytes(tmp_path, raw: bytes) -> str:
    """A checkpoint whose metadata tensor holds ``raw``, as a crafted file would."""
    prefix = ss.Saver({"m": np.array(raw, dtype=object), "w": np.zeros(2)}).save(str(tmp_path / "c"))
    return Crafted.load(prefix).rename("m", METADATA_NAME).save()


def test_read_metadata_refuses_more_than_the_writer_allows(tmp_path):
    huge = b'{"a": "' + b"x" * ss.metadata.MAX_METADATA_BYTES + b'"}'
    prefix = _with_metadata_bytes(tmp_path, huge)
    with pytest.raises(ss.errors.DataLossError, match=f"{METADATA_NAME}.*bytes"):
        ss.read_metadata(prefix)


def test_read_metadata_takes_utf8_only(tmp_path):
    # json.loads(bytes) guesses UTF-16/32 from the first bytes; the writer only writes UTF-8
    prefix = _with_metadata_bytes(tmp_path, '{"a": 1}'.encode("utf-16"))
    with pytest.raises(ss.errors.DataLossError, match="UTF-8"):
        ss.read_metadata(prefix)


@pytest.mark.parametrize("name", ["\x00", "\x00a"])
def test_a_name_beginning_with_nul_is_refused_not_a_bare_valueerror(tmp_path, name):
    # the index's slice keys begin with a NUL byte: such a name would read as one
    with pytest.raises(ss.errors.InvalidArgumentError, match="NUL"):
        ss.Saver({name: np.zeros(2)}).save(str(tmp_path / "c"))
    with pytest.raises(ss.errors.InvalidArgumentError, match="NUL"):
        ss.Saver([ss.Variable(name, np.zeros(2), register=False)]).save(str(tmp_path / "c"))


def test_a_tree_that_contains_itself_is_refused(tmp_path):
    tree: dict = {"w": np.zeros(2)}
    tree["self"] = tree
    with pytest.raises(ss.errors.InvalidArgumentError, match="self.*contains itself"):
        ss.Saver(tree)
    looped: list = [np.zeros(1)]
    looped.append({"x": looped})
    with pytest.raises(ss.errors.InvalidArgumentError, match="1/x"):
        ss.Saver({"a": looped})
