"""Crash consistency under mpiexec, on local files and on S3 (moto's server).

Each test runs tests/faults/crash_save.py on 3 ranks: two good saves, then a third save
during which a process is SIGKILLed, either a rank in the middle of writing its data file
(``writer``, a new checkpoint) or the coordinator just before it publishes the index
(``index``, while re-saving ``ckpt-2``, which the state file already names: its old
index and data stay, the new data files are staged under names of their own). Then, in
this process: the job died instead of hanging, the newest committed checkpoint is still
``latest_checkpoint`` and restores bit-exact, ``shardsave gc`` lists and removes exactly
what the failed save left, and a later successful save of the same prefix (on another
rank count) removes those leftovers by itself. (Re-saves of one fixed prefix killed at
every moment: tests/test_resave.py.)
"""

from __future__ import annotations

import json
import os
import re

import pytest
from faults.common import HERE, assign, check_equal, make_vars, run_mpi
from storage_helpers import glob

import shardsave as ss
from shardsave import cli, storage

SCRIPT = os.path.join(HERE, "crash_save.py")
RANKS = 3
SMALL_ROWS = 60
BIG_ROWS = 3 * 5500  # 5.6 MB a rank: with 5 MiB parts the killed rank leaves an unfinished upload
PART = 5 << 20


def gc(directory: str, options, capsys, dry_run: bool) -> tuple[list[str], str]:
    argv = ["--storage-options", json.dumps(options)] if options else []
    argv += ["gc", directory] + (["--dry-run"] if dry_run else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    verb = "would delete " if dry_run else "deleting "
    return sorted(line[len(verb) :] for line in out.splitlines() if line.startswith(verb)), out


def unstaged(name: str) -> str:
    """The final name of a staged data file (``<final>.<save id>.staged``)."""
    m = re.fullmatch(r"(.+)\.[0-9a-f]{16}\.staged", name)
    assert m, name
    return m[1]


def kept_files(fault: str, crashed: str) -> list[str]:
    """The files of the checkpoint whose re-save died ("index"): they stay."""
    if fault != "index":
        return []
    return [f"{crashed}.index"] + [f"{crashed}.data-{r:05d}-of-{RANKS:05d}" for r in range(RANKS)]


def names(directory: str, options) -> list[str]:
    return [f.name for f in glob(storage.resolve(directory, options), "*")]


@pytest.mark.parametrize("fault", ["writer", "index"])
def test_killed_save_keeps_previous_checkpoint(fault, where, capsys):
    directory, options, env = where
    s3 = options is not None
    rows = BIG_ROWS if s3 and fault == "writer" else SMALL_ROWS
    # "index" re-saves ckpt-2 and dies before its commit point: the old ckpt-2 stays (before
    # commit.py the old index was deleted first, and ckpt-1 was the newest left)
    crash_step, previous = (3, 2) if fault == "writer" else (2, 2)
    args = [
        SCRIPT,
        "--dir",
        directory,
        "--rows",
        str(rows),
        "--steps",
        "1",
        "2",
        "--crash-step",
        str(crash_step),
        "--fault",
        fault,
        "--part-bytes",
        str(PART),
    ]
    if s3:
        args += ["--storage-options", json.dumps(options)]
    proc = run_mpi(RANKS, args, env=env, timeout=120)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, log
    assert f"saved {directory}/model.ckpt-2" in proc.stdout, log
    assert "should have crashed" not in proc.stdout, log

    # the newest committed checkpoint is the latest, and restores bit for bit
    latest = ss.latest_checkpoint(directory, storage_options=options)
    assert latest == f"{directory}/model.ckpt-{previous}"
    if fault == "index":  # the state file names the checkpoint whose re-save died
        state = ss.get_checkpoint_state(directory, storage_options=options)
        assert state.model_checkpoint_path == f"{directory}/model.ckpt-2"
    variables = make_vars(rows)
    ss.Saver(storage_options=options).restore(latest)
    check_equal(variables, previous, rows)

    # what the failed save left: its data files, and no index (of its own). They are staged
    # (named for the save) locally and when re-saving; a new prefix on S3 gets the final names.
    crashed = f"model.ckpt-{crash_step}"
    present = names(directory, options)
    data = [f"{crashed}.data-{r:05d}-of-{RANKS:05d}" for r in range(RANKS)]
    staged = not s3 or fault == "index"
    # on S3 the killed rank's object was never completed; locally its file is there, short
    expected_data = [data[0], data[2]] if fault == "writer" and s3 else data
    left = sorted(n for n in present if n.startswith(crashed + ".") and n not in kept_files(fault, crashed))
    assert [unstaged(n) if staged else n for n in left] == expected_data, left
    if staged:
        assert len({n.rsplit(".", 2)[1] for n in left}) == 1  # one save id
    expected = left
    urls = sorted(f"{directory}/{n}" for n in expected)

    listed, out = gc(directory, options, capsys, dry_run=True)
    assert listed == urls, out
    if fault == "writer" and s3:
        assert f"would abort unfinished upload of {directory}/{data[1]}" in out
        assert [u[0].name for u in storage.pending_uploads(storage.resolve(directory, options))] == [data[1]]
    kept = {n: storage.read_bytes(storage.resolve(f"{directory}/{n}", options)) for n in expected}

    deleted, out = gc(directory, options, capsys, dry_run=False)
    assert deleted == urls, out
    after = names(directory, options)
    assert [n for n in after if n.startswith(crashed + ".")] == sorted(kept_files(fault, crashed))
    assert set(present) - set(expected) <= set(after)  # nothing else went
    assert storage.pending_uploads(storage.resolve(directory, options)) == []
    assert gc(directory, options, capsys, dry_run=True)[0] == []
    assert ss.latest_checkpoint(directory, storage_options=options) == latest

    # the leftovers again; a later successful save of that prefix on 1 rank removes them
    for n, blob in kept.items():
        storage.publish(storage.resolve(f"{directory}/{n}", options), blob)
    variables = make_vars(rows)
    assign(variables, crash_step, rows)
    prefix = ss.Saver(storage_options=options).save(f"{directory}/model.ckpt", global_step=crash_step)
    assert prefix == f"{directory}/{crashed}"
    assert sorted(n for n in names(directory, options) if n.startswith(crashed + ".")) == [
        f"{crashed}.data-00000-of-00001",
        f"{crashed}.index",
    ]
    assert gc(directory, options, capsys, dry_run=True)[0] == []
    assert ss.latest_checkpoint(directory, storage_options=options) == prefix
    variables = make_vars(rows)
    ss.Saver(storage_options=options).restore(prefix)
    check_equal(variables, crash_step, rows)
