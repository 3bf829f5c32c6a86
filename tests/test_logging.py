"""The ``shardsave`` logger: one INFO line per save, restore and retention delete, DEBUG
for the protocol's steps, and no handler or level of its own (the application decides)."""

from __future__ import annotations

import logging

import numpy as np

import shardsave as ss


def test_the_package_configures_no_logging():
    logger = logging.getLogger("shardsave")
    assert logger.level == logging.NOTSET
    assert not [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    assert logger.propagate


def test_info_lines_for_save_restore_and_retention(tmp_path, caplog):
    w = ss.Variable("w", np.arange(1000, dtype=np.float32), register=False)
    saver = ss.Saver([w], max_to_keep=1)
    prefix = str(tmp_path / "model.ckpt")
    with caplog.at_level(logging.INFO, logger="shardsave"):
        first = saver.save(prefix, global_step=1)
        second = saver.save(prefix, global_step=2)
        saver.restore(second)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines[0].startswith(f"saved {first}: 4") and "on 1 ranks" in lines[0]
    assert f"saved {second}: " in lines[1]
    assert lines[2] == f"retention deleted {first}"
    assert lines[3].startswith(f"restored {second}: 1 variables, this rank read 4")
    assert len(lines) == 4
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]


def test_debug_lines_for_the_protocol_steps(tmp_path, caplog):
    w = ss.Variable("w", np.zeros(3), register=False)
    saver = ss.Saver([w])
    with caplog.at_level(logging.DEBUG, logger="shardsave"):
        saver.save(str(tmp_path / "m"))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("step 2, plan made" in m for m in debug)
    assert any("step 3" in m for m in debug)
    assert any("step 4, rank 0 wrote" in m for m in debug)
