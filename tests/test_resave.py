"""A checkpoint is never lost: re-saves of one fixed prefix killed at every moment, and two
jobs saving the same prefix at once, on local files and on S3 (moto's server).

Each crash test runs tests/faults/crash_save.py on 2 ranks: a good save of
``D/model.ckpt`` (no step in the prefix, as examples/save_model.py), then a re-save of
it with other values during which one process is SIGKILLed (commit.py names the moments):

- ``writer-1`` / ``writer-0``: a non-coordinator rank, or the coordinator, dies in the
  middle of writing its data file;
- ``index``: the coordinator dies when about to publish the journal (every staged data
  file is written and checked);
- ``renames``: it dies after renaming the first staged data file to its final name (the
  old index now names a new data file: the window a restore must close);
- ``final``: it dies just before renaming the journal to ``.index``.

The first two leave the old checkpoint, the last two the new one (the journal is its
commit point). In this process, on three copies of what the job left, each of the next
restore, ``shardsave gc`` and save must close the window: ``latest_checkpoint`` names the
prefix, it restores bit-exact to the surviving values, and gc leaves no leftovers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from faults.common import HERE, REPO, assign, check_equal, make_vars, run_mpi
from storage_helpers import glob

import shardsave as ss
from shardsave import cli, storage

CRASH = os.path.join(HERE, "crash_save.py")
PAUSED = os.path.join(HERE, "paused_save.py")
RANKS = 2
ROWS = 60
OLD, NEW = 1, 2  # the steps whose values the good save and the killed re-save write
FAULTS = {  # name: (fault of crash_save.py, rank killed, the values that survive)
    "writer-1": ("writer", 1, OLD),
    "writer-0": ("writer", 0, OLD),
    "index": ("index", 0, OLD),
    "renames": ("renames", 0, NEW),
    "final": ("final", 0, NEW),
}
JOURNAL = re.compile(r"model\.ckpt\.index\.[0-9a-f]{16}\.pending")
COMMITTED = [
    "checkpoint",
    "model.ckpt.data-00000-of-00002",
    "model.ckpt.data-00001-of-00002",
    "model.ckpt.index",
]


def names(directory: str, options) -> list[str]:
    return sorted(f.name for f in glob(storage.resolve(directory, options), "*"))


def copy_dir(src: str, dst: str, options) -> None:
    if options is None:
        shutil.copytree(src, dst)
        return
    source, dest = storage.resolve(src, options), storage.resolve(dst, options)
    for name in names(src, options):
        source.fs.cp_file(source.child(name).path, dest.child(name).path)


def gc(directory: str, options, capsys, dry_run: bool = False) -> str:
    argv = ["--storage-options", json.dumps(options)] if options else []
    assert cli.main(argv + ["gc", directory] + (["--dry-run"] if dry_run else [])) == 0
    return capsys.readouterr().out


def assert_clean(directory: str, options, capsys, committed: list[str]) -> None:
    """Exactly the committed checkpoint's files are left, and gc finds nothing to do."""
    assert names(directory, options) == committed
    assert storage.pending_uploads(storage.resolve(directory, options)) == []
    out = gc(directory, options, capsys, dry_run=True)
    assert "0 leftover file(s) found" in out and "would" not in out, out


def assert_restores(directory: str, options, step: int, latest: bool = True) -> None:
    """The prefix restores bit-exact to the values of ``step``; with ``latest`` it is the
    directory's latest checkpoint (copies of a directory keep the original's state file,
    which names the original by its absolute path)."""
    prefix = f"{directory}/model.ckpt"
    if latest:
        assert ss.latest_checkpoint(directory, storage_options=options) == prefix
    variables = make_vars(ROWS)
    ss.Saver(storage_options=options).restore(prefix)
    check_equal(variables, step, ROWS)


@pytest.mark.parametrize("name", list(FAULTS))
def test_killed_resave_leaves_old_or_new_checkpoint(name, where, capsys):
    directory, options, env = where
    fault, rank, survivor = FAULTS[name]
    if options is not None and name == "writer-0":
        pytest.skip("the coordinator killed while writing: as writer-1 on S3, covered locally")
    args = [
        CRASH,
        "--dir",
        directory,
        "--rows",
        str(ROWS),
        "--fixed",
        "--steps",
        str(OLD),
        "--crash-step",
        str(NEW),
        "--fault",
        fault,
        "--kill-rank",
        str(rank),
    ]
    if options is not None:
        args += ["--storage-options", json.dumps(options)]
    proc = run_mpi(RANKS, args, env=env, timeout=120)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, log
    assert f"saved {directory}/model.ckpt" in proc.stdout, log
    assert "should have crashed" not in proc.stdout, log

    # the old index is never removed, so the prefix stays the latest checkpoint; after the
    # commit point the journal stands for the new one
    left = names(directory, options)
    assert "model.ckpt.index" in left, left
    assert any(JOURNAL.fullmatch(n) for n in left) == (survivor == NEW), left
    assert ss.latest_checkpoint(directory, storage_options=options) == f"{directory}/model.ckpt"

    copies = {closer: f"{directory}-{closer}" for closer in ("restore", "save")}
    for copy in copies.values():
        copy_dir(directory, copy, options)

    # the next restore finishes the interrupted commit (or ignores the staged files)
    assert_restores(copies["restore"], options, survivor, latest=False)
    gc(copies["restore"], options, capsys)
    assert_clean(copies["restore"], options, capsys, COMMITTED)
    assert_restores(copies["restore"], options, survivor, latest=False)

    # gc alone does too
    out = gc(directory, options, capsys)
    assert ("finishing the interrupted save" in out) == (survivor == NEW), out
    assert_clean(directory, options, capsys, COMMITTED)
    assert_restores(directory, options, survivor)

    # and so does the next save of the prefix (on another number of ranks)
    variables = make_vars(ROWS)
    assign(variables, 3, ROWS)
    ss.Saver(storage_options=options).save(f"{copies['save']}/model.ckpt")
    assert_clean(
        copies["save"], options, capsys, ["checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"]
    )
    assert_restores(copies["save"], options, 3)


def save_fixed(directory: str, options, step: int) -> str:
    variables = make_vars(ROWS)
    assign(variables, step, ROWS)
    return ss.Saver(storage_options=options).save(f"{directory}/model.ckpt")


@pytest.mark.parametrize("fresh", [False, True], ids=["resave", "fresh"])
def test_two_jobs_saving_one_prefix_at_once(fresh, where, tmp_path, capsys):
    """Job A has written its data file when job B saves the same prefix from start to
    end; A then goes on to commit. A must fail saying another save is writing the prefix
    (not "do the ranks share a filesystem?", not silently), and B's checkpoint stays
    whole."""
    directory, options, env = where
    if not fresh:
        save_fixed(directory, options, 1)
    flag = str(tmp_path / "flag")
    args = [sys.executable, PAUSED, "--dir", directory, "--rows", str(ROWS), "--step", "2", "--flag", flag]
    if options is not None:
        args += ["--storage-options", json.dumps(options)]
    job_a = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag + ".ready"):
            assert job_a.poll() is None and time.monotonic() < deadline, job_a.communicate()
            time.sleep(0.02)
        save_fixed(directory, options, 3)  # job B
        open(flag + ".go", "w").close()
        out, err = job_a.communicate(timeout=60)
    finally:
        job_a.kill()
    assert job_a.returncode == 0, err[-3000:]
    assert out.startswith("error AbortedError: "), out + err[-3000:]
    assert f"another save is writing {directory}/model.ckpt at the same time" in out, out
    assert "two jobs saving into one directory?" in out, out
    assert_restores(directory, options, 3)
    assert_clean(
        directory, options, capsys, ["checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"]
    )


# ---------------------------------------------------------------- one process, no kill
def staged_resave(directory: str, monkeypatch, stop_at: str) -> None:
    """Re-save ``directory/model.ckpt`` with the values of NEW and stop it (an exception,
    as a kill would) at ``stop_at``: "renames" after the first staged file is renamed."""
    from shardsave.save import commit

    def stop(*args, **kwargs):
        raise KeyboardInterrupt(stop_at)

    if stop_at == "renames":
        monkeypatch.setattr(commit.storage, "rename_all", stop)
    variables = make_vars(ROWS)
    assign(variables, NEW, ROWS)
    with pytest.raises(KeyboardInterrupt):
        ss.Saver(variables).save(f"{directory}/model.ckpt")
    monkeypatch.undo()


def test_a_journal_naming_a_missing_file_is_data_loss(tmp_path, monkeypatch):
    directory = str(tmp_path)
    save_fixed(directory, None, OLD)
    staged_resave(directory, monkeypatch, "renames")
    staged = [n for n in names(directory, None) if n.endswith(".staged")]
    assert len(staged) == 1, names(directory, None)
    final = staged[0].rsplit(".", 2)[0]
    os.remove(os.path.join(directory, staged[0]))
    os.remove(os.path.join(directory, final))
    with pytest.raises(
        ss.DataLossError, match=re.escape(os.path.join(directory, final)) + ".*neither staged nor"
    ):
        ss.Saver(make_vars(ROWS)).restore(f"{directory}/model.ckpt")


def test_gc_dry_run_names_the_commit_it_would_finish(tmp_path, monkeypatch, capsys):
    directory = str(tmp_path)
    save_fixed(directory, None, OLD)
    staged_resave(directory, monkeypatch, "renames")
    before = names(directory, None)
    out = gc(directory, None, capsys, dry_run=True)
    assert f"would finish the interrupted save of {directory}/model.ckpt" in out, out
    assert names(directory, None) == before
    reader = ss.CheckpointReader(f"{directory}/model.ckpt")  # a reader finishes it too
    assert reader.get_tensor("embedding").tobytes() == make_expected(NEW)
    assert names(directory, None) == ["checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"]


def make_expected(step: int) -> bytes:
    from faults.common import global_values

    return global_values(step, ROWS)["embedding"].tobytes()


def test_a_reader_that_may_not_list_restores_as_before(tmp_path, monkeypatch):
    """An S3 reader allowed GetObject but not ListBucket cannot look for an unfinished
    commit; its restore must still work as it did before there was anything to look for."""
    from shardsave.save import commit

    directory = str(tmp_path)
    save_fixed(directory, None, OLD)

    def denied(loc):
        raise ss.PermissionDeniedError(f"listing {loc.url}: permission denied")

    monkeypatch.setattr(commit.storage, "files_in", denied)
    variables = make_vars(ROWS)
    ss.Saver().restore(f"{directory}/model.ckpt")
    check_equal(variables, OLD, ROWS)
