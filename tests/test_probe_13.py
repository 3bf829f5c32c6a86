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


def test_a_save_below_the_newest_step_without_resuming_deletes_nothing(tmp_path):
    d = str(tmp_path / "run")
    w = np.ones(4, np.float32)
    with ss.CheckpointManager(d, {"w": w}, max_to_keep=5) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, blocking=True)
        with pytest.raises(ss.errors.FailedPreconditionError, match="save\\(20\\).*holds step 30"):
            mgr.save(20)  # steps going backwards in one process
    with ss.CheckpointManager(d, {"w": w}, max_to_keep=5) as mgr:  # a loop that forgot to resume
        assert mgr.should_save(0)
        with pytest.raises(ss.errors.FailedPreconditionError, match="restore_or_initialize"):
            mgr.save(0, blocking=True)
        assert mgr.all_steps() == [10, 20, 30]
        assert mgr.restore_or_initialize() == 30
        mgr.save(5, blocking=True)  # after resuming: a deliberate new timeline replaces them
        assert mgr.all_steps() == [5]


def test_a_masked_array_is_refused_not_saved_as_its_fill_values(tmp_path):
    x = np.ma.array([1.0, 2.0], mask=[False, True])
    with pytest.raises(ss.errors.InvalidArgumentError, match="'x'.*masked array"):
        ss.Saver({"x": x})  # stored 1e20 (the fill value) for the masked element, silently
    with pytest.raises(ss.errors.InvalidArgumentError, match="'x'.*masked array"):
        ss.Variable("x", x, register=False)  # stored the data, dropping the mask


def test_manager_metadata_of_a_step_saved_without_is_none(tmp_path):
    with ss.CheckpointManager(str(tmp_path), {"w": np.ones(2)}) as mgr:
        mgr.save(1, metrics={"loss": 1.0})
        mgr.save(2, metadata={"lr": 0.1})
        assert mgr.metadata(1) is None  # was {}: the manager's own record was all it held
        assert mgr.metadata(2) == {"lr": 0.1}
