"""Names are literal: a prefix is a string, never a glob; retention, ``gc`` and every
delete touch only files of the checkpoint's own directory that belong to one of its
checkpoints; prefixes, variable names and steps that cannot name a checkpoint are
refused before anything is written. On local files and on the S3 server (moto's).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

import shardsave as ss
from shardsave import cli, storage
from shardsave.errors import DataLossError, InvalidArgumentError
from shardsave.format import names
from shardsave.format.state import MAX_STATE_BYTES, MAX_STATE_ENTRIES

TEMP_HEX = "0123456789abcdef" * 2  # what storage.publish appends: .tmp<uuid4 hex>


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(directory URL, storage options) on local files and on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    server = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_dir"), server.options()


def files(directory: str, options) -> list[str]:
    return [f.name for f, _ in storage.scan(storage.resolve(directory, options))]


def put(url: str, options, data: bytes = b"junk") -> None:
    loc = storage.resolve(url, options)
    storage.makedirs(loc.parent)
    storage.publish(loc, data, fsync=False)


def saver_of(value: float, options, **kw) -> ss.Saver:
    return ss.Saver([ss.Variable("w", np.full(4, value), register=False)], storage_options=options, **kw)


def restored(prefix: str, options) -> float:
    v = ss.Variable("w", np.zeros(4), register=False)
    ss.Saver([v], storage_options=options).restore(prefix)
    return float(v.value[0])


# ------------------------------------------------------------------ names, parsed exactly
def test_data_file_names_parse_exactly():
    assert names.parse_data_file_name("m.data-00001-of-00002") == ("m", 1, 2)
    assert names.parse_data_file_name("m*.data-123456-of-200000") == ("m*", 123456, 200000)
    assert names.parse_data_file_name("a.data-00000-of-00001.data-00000-of-00001") == (
        "a.data-00000-of-00001",
        0,
        1,
    )
    for name in [
        "m.data-0-of-1",
        "m.data-000000-of-00001",
        "m.data-00001-of-00001",
        "m.data-backup",
        "m.data-00000-of-00001.bak",
        "m.data-\u0660\u0660\u0660\u0660\u0660-of-00001",
    ]:
        assert names.parse_data_file_name(name) is None, name
    assert names.data_files_of(["m?.data-00000-of-00001", "mX.data-00000-of-00001"], "m?") == [
        "m?.data-00000-of-00001"
    ]
    assert names.is_publish_temp(f"m.index.tmp{TEMP_HEX}") and names.is_publish_temp(
        f"checkpoint.tmp{TEMP_HEX}"
    )
    assert not names.is_publish_temp(f"m.index.tmp{TEMP_HEX}.index")
    assert not names.is_publish_temp("checkpoint.tmpfoo.index")


# ------------------------------------------------------------------ prefixes are literal
def test_glob_characters_in_a_prefix_are_literal(where):
    d, opts = where
    saver_of(1.0, opts).save(f"{d}/ckpt")
    saver_of(2.0, opts).save(f"{d}/ck*")  # once deleted ckpt's data file, leaving its index
    saver_of(3.0, opts).save(f"{d}/m[1]")  # once could never commit: "[1]" matched only "1"
    saver_of(4.0, opts).save(f"{d}/m?")
    assert restored(f"{d}/ckpt", opts) == 1.0
    assert restored(f"{d}/ck*", opts) == 2.0
    assert restored(f"{d}/m[1]", opts) == 3.0
    assert restored(f"{d}/m?", opts) == 4.0
    assert sorted(files(d, opts)) == sorted(
        ["checkpoint"]
        + [f"{p}{s}" for p in ("ckpt", "ck*", "m[1]", "m?") for s in (".index", ".data-00000-of-00001")]
    )


def test_retention_deletes_only_its_own_checkpoint(where):
    """Retention of ``model?-1`` once deleted ``modelX-1``'s data too."""
    d, opts = where
    saver_of(7.0, opts).save(f"{d}/modelX", global_step=1)
    saver = saver_of(1.0, opts, max_to_keep=1)
    saver.save(f"{d}/model?", global_step=1)
    saver.save(f"{d}/model?", global_step=2)
    assert restored(f"{d}/modelX-1", opts) == 7.0
    assert restored(f"{d}/model?-2", opts) == 1.0
    assert not any(n.startswith("model?-1") for n in files(d, opts))


def test_files_that_only_look_like_data_files_are_kept(where):
    """Neither a save's clean-up of old data files nor retention takes a file whose name
    is not exactly a data file of the checkpoint at hand."""
    d, opts = where
    decoys = ["c-1.data-backup", "c-1.data-0-of-1", "c-1.data-00000-of-00001.bak", "c-1.data-000000-of-00002"]
    for name in decoys:
        put(f"{d}/{name}", opts)
    saver_of(9.0, opts).save(f"{d}/c-1.data-00000-of-00001")  # a checkpoint of its own
    saver = saver_of(1.0, opts, max_to_keep=1)
    saver.save(f"{d}/c", global_step=1)
    assert restored(f"{d}/c-1", opts) == 1.0
    saver.save(f"{d}/c", global_step=2)  # retention deletes c-1
    assert sorted(files(d, opts)) == sorted(
        decoys
        + [
            "checkpoint",
            "c-2.index",
            "c-2.data-00000-of-00001",
            "c-1.data-00000-of-00001.index",
            "c-1.data-00000-of-00001.data-00000-of-00001",
        ]
    )
    assert restored(f"{d}/c-1.data-00000-of-00001", opts) == 9.0


# ------------------------------------------------------------------ only its own directory
def test_retention_never_deletes_outside_its_directory(where):
    """A state file naming checkpoints elsewhere (``../../victim/x``, an absolute path, a
    subdirectory): after the documented resume, retention drops them from its list
    with a warning and deletes none of them."""
    base, opts = where
    d = f"{base}/a/ckpts"
    victims = [f"{base}/victim/x", f"{base}/victim/y", f"{d}/sub/z"]
    listed = ["../../victim/x", f"{base}/victim/y", "sub/z"]
    if opts is None:  # through a symlink: D/link/../w is where link points, not D/w
        os.makedirs(f"{base}/victim/inner")
        os.makedirs(d)
        os.symlink(f"{base}/victim/inner", f"{d}/link")
        victims.append(f"{base}/victim/w")
        listed.append("link/../w")
    for i, prefix in enumerate(victims):
        saver_of(10.0 + i, opts).save(prefix)
    state = "".join(f'all_model_checkpoint_paths: "{p}"\n' for p in listed)
    put(f"{d}/checkpoint", opts, f'model_checkpoint_path: "{listed[-1]}"\n{state}'.encode())

    saver = saver_of(1.0, opts, max_to_keep=1)
    saver.recover_last_checkpoints(
        ss.get_checkpoint_state(d, storage_options=opts).all_model_checkpoint_paths
    )
    assert len(saver.last_checkpoints) >= 2  # the outside ones exist and were adopted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saver.save(f"{d}/m", global_step=1)
        saver.save(f"{d}/m", global_step=2)
    for i, prefix in enumerate(victims):
        assert restored(prefix, opts) == 10.0 + i, prefix
    said = " ".join(str(w.message) for w in caught)
    assert "not deleting checkpoint" in said and "victim/y" in said and "sub/z" in said
    assert saver.last_checkpoints == [f"{d}/m-2"]
    assert [n for n in files(d, opts) if n.startswith("m-")] == ["m-2.data-00000-of-00001", "m-2.index"]


def test_gc_deletes_only_exact_leftovers(where):
    d, opts = where
    saver_of(1.0, opts).save(f"{d}/ok")
    saver_of(2.0, opts).save(f"{d}/checkpoint.tmpfoo")  # once taken as a state temp file
    saver_of(3.0, opts).save(f"{d}/a.index.tmpZ")  # once taken as an index temp file
    leftovers = ["gone.data-00000-of-00001", f"ok.index.tmp{TEMP_HEX}", f"checkpoint.tmp{TEMP_HEX}"]
    kept = ["ckpt.data-backup", "gone.data-0-of-1", "gone.data-000000-of-00001"]
    for name in leftovers + kept:
        put(f"{d}/{name}", opts)
    put(f"{d}/sub/gone.data-00000-of-00001", opts)
    before = set(files(d, opts))
    argv = (["--storage-options", json.dumps(opts)] if opts else []) + ["gc", d]
    assert cli.main(argv) == 0
    assert set(files(d, opts)) == before - set(leftovers)
    assert files(f"{d}/sub", opts) == ["gone.data-00000-of-00001"]
    assert restored(f"{d}/checkpoint.tmpfoo", opts) == 2.0
    assert restored(f"{d}/a.index.tmpZ", opts) == 3.0


# ------------------------------------------------------------------ the state file is capped
def test_state_file_size_and_entries_are_capped(where):
    d, opts = where
    put(f"{d}/checkpoint", opts, b"")  # an empty state file is read (a ranged GET fails on S3)
    assert ss.latest_checkpoint(d, storage_options=opts) is None
    line = 'all_model_checkpoint_paths: "m-1"\n'
    put(f"{d}/checkpoint", opts, ('model_checkpoint_path: "m-1"\n' + line * MAX_STATE_ENTRIES).encode())
    assert (
        len(ss.get_checkpoint_state(d, storage_options=opts).all_model_checkpoint_paths) == MAX_STATE_ENTRIES
    )
    put(f"{d}/checkpoint", opts, ('model_checkpoint_path: "m-1"\n' + line * (MAX_STATE_ENTRIES + 1)).encode())
    with pytest.raises(DataLossError, match=f"{d}/checkpoint.*more than {MAX_STATE_ENTRIES}"):
        ss.get_checkpoint_state(d, storage_options=opts)
    put(f"{d}/checkpoint", opts, b'model_checkpoint_path: "m-1"\n' + b"#" * MAX_STATE_BYTES + b"\n")
    with pytest.raises(DataLossError, match=f"{d}/checkpoint.*larger than {MAX_STATE_BYTES}"):
        ss.latest_checkpoint(d, storage_options=opts)
    with pytest.raises(InvalidArgumentError, match="max_to_keep"):
        saver_of(1.0, opts, max_to_keep=MAX_STATE_ENTRIES + 1)
    with pytest.raises(InvalidArgumentError, match="a state file holds at most"):  # none that readers refuse
        ss.update_checkpoint_state(d, "m-1", ["m-0"] * MAX_STATE_ENTRIES, storage_options=opts)


# ------------------------------------------------------------------ refused before writing
def _nothing_written(root: str, opts) -> bool:
    loc = storage.resolve(root, opts)
    if loc.is_local:
        return not any(files for _, _, files in os.walk(root))
    return loc.fs.find(loc.path) == []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_prefixes_that_name_no_file_are_refused(kind, tmp_path, monkeypatch, request):
    if kind == "local":
        root, opts = str(tmp_path / "root"), None
        os.makedirs(f"{root}/work")
        monkeypatch.chdir(f"{root}/work")
        bad = [".", "..", f"{root}/D/new/", f"{root}/D/.", "./"]
    else:
        opts = request.getfixturevalue("s3_server").options()
        root = request.getfixturevalue("s3_dir")
        bad = [f"{root}/D/new/", f"{root}/D/.", f"{root}/..", "s3://" + root.split("/")[2]]
    saver = saver_of(1.0, opts)
    for prefix in bad:
        with pytest.raises(InvalidArgumentError, match="cannot save to"):
            saver.save(prefix)
    assert _nothing_written(os.path.dirname(root) if kind == "local" else root, opts)
    assert saver.save(f"{root}/D/new/", global_step=3) == f"{root}/D/new/-3"  # a name after the slash


def test_prefix_under_a_regular_file_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    saver = saver_of(1.0, None)
    for prefix in (f"{afile}/ckpt", f"{afile}/sub/ckpt"):
        with pytest.raises(InvalidArgumentError, match=f"{afile} is a file, not a directory"):
            saver.save(prefix)
    assert os.listdir(tmp_path) == ["afile"] and afile.read_bytes() == b"x"


def test_empty_variable_name_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="name ''"):
        ss.Saver({"": ss.Variable("w", np.zeros(3), register=False)})
    assert os.listdir(tmp_path) == []


def test_global_step_must_be_an_integer(tmp_path):
    saver = saver_of(1.0, None)
    for step in (1.5, 2.0, np.float32(3), "3", np.array([3]), np.array(2.5)):
        with pytest.raises(InvalidArgumentError, match="global_step must be an integer"):
            saver.save(f"{tmp_path}/m", global_step=step)
    assert os.listdir(tmp_path) == []
    steps = [
        3,
        np.int32(4),
        np.array(5),
        np.uint8(6),
        ss.Variable("step", np.array(7, np.int64), register=False),
    ]
    for want, step in zip(range(3, 8), steps, strict=True):
        assert saver.save(f"{tmp_path}/m", global_step=step) == f"{tmp_path}/m-{want}"
    padded = saver_of(1.0, None, pad_step_number=True)
    assert padded.save(f"{tmp_path}/p", global_step=np.int64(12)) == f"{tmp_path}/p-00000012"


# ------------------------------------------------------------------ on 3 ranks
RANKS_SCRIPT = """
import sys
import numpy as np
import shardsave as ss
from mpi4py import MPI
from shardsave.errors import InvalidArgumentError

d, rank, size = sys.argv[1], MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
v = ss.Variable("w", np.zeros(2), global_shape=(2 * size,), offset=(2 * rank,))
saver = ss.Saver([v])
for value, prefix in [(1.0, "ckpt"), (2.0, "ck*"), (3.0, "m[1]")]:
    v.assign(np.full(2, value))
    saver.save(f"{d}/{prefix}")
try:
    saver.save(f"{d}/afile/ckpt")
except InvalidArgumentError as exc:
    print(f"rank {rank}: InvalidArgumentError: {exc}", flush=True)
"""


def test_literal_prefixes_and_refused_prefix_on_three_ranks(tmp_path):
    from faults.common import run_mpi

    (tmp_path / "afile").write_bytes(b"x")
    proc = run_mpi(3, ["-c", RANKS_SCRIPT, str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(3):
        assert (
            f"rank {rank}: InvalidArgumentError: " in proc.stdout
            and "is a file, not a directory" in proc.stdout
        )
    for value, prefix in [(1.0, "ckpt"), (2.0, "ck*"), (3.0, "m[1]")]:
        assert ss.load_variable(f"{tmp_path}/{prefix}", "w").tolist() == [value] * 6, prefix
        data = sorted(names.data_files_of(os.listdir(tmp_path), prefix))
        assert data == [names.data_file_name(prefix, r, 3) for r in range(3)], prefix


def test_staged_and_journal_names_parse_back():
    """Each name a save writes parses back into its parts; near misses do not."""
    save_id = "0123456789abcdef"
    final = names.data_file_name("dir/m-3", 1, 2)
    assert names.parse_staged_name(names.staged_name(final, save_id)) == (final, "dir/m-3", save_id)
    assert names.parse_staged_name(f"{final}.{save_id[:-1]}.staged") is None  # a 15-digit id
    assert names.parse_staged_name(f"dir/m-3.data-00002-of-00002.{save_id}.staged") is None  # shard >= count
    journal = names.journal_name("dir/m-3", save_id)
    assert journal == f"dir/m-3.index.{save_id}.pending"
    assert names.parse_journal_name(journal) == ("dir/m-3", save_id)
    assert names.parse_journal_name(journal + ".tmp1f") is None
    assert names.prefix_of_index("dir/m-3.index") == "dir/m-3"
    assert names.prefix_of_index("dir/m-3.indexx") is None
