"""The ``shardsave`` command's inspect/ls on file paths, ls sizes, verify and diff (issue 13).

Most runs call ``cli.main(argv)`` in this process (the same code, without the start-up
cost); a few run the real command in a subprocess, as a user does: exit status, stdout
and stderr, never a traceback. Damage is made in real files, with tests/crafting.py's
helpers where an index field is edited and its checksums made right again.
"""

from __future__ import annotations

import contextlib
import io
import os
import pty
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import shardsave_main
from crafting import Crafted, save_standard

import shardsave as ss
from shardsave import _inspect, _verify, cli, storage
from shardsave.format.index import entry_key

REPO = Path(__file__).resolve().parent.parent
TF_DATA = REPO / "tests" / "data" / "tf"
EMB_PIECE = entry_key("emb", [(256, 256), (0, 1024)])
"""The second stored piece of the standard checkpoint's ``emb`` (1 MiB, with block CRCs)."""


def main(*args: str) -> tuple[int, str, str]:
    """``shardsave ARGS`` in this process: exit status, stdout, stderr; never a traceback."""
    code, out, err = shardsave_main(*args)
    assert "Traceback" not in out + err
    return code, out, err


def command(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The real command: ``python -m shardsave.cli ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "shardsave.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def standard(tmp_path_factory) -> str:
    return save_standard(str(tmp_path_factory.mktemp("standard")))


@pytest.fixture
def crafted(standard, tmp_path) -> Crafted:
    """A fresh copy of the standard checkpoint (``emb`` in two pieces with block CRCs, a
    string tensor, two small ones), parsed for editing."""
    shutil.copytree(os.path.dirname(standard), tmp_path / "ckpt")
    return Crafted.load(str(tmp_path / "ckpt" / "m"))


@pytest.fixture
def sharded(tmp_path) -> Path:
    """TensorFlow's checkpoint with two data files (tests/data), copied."""
    shutil.copytree(TF_DATA / "sharded", tmp_path / "sharded")
    return tmp_path / "sharded"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ file paths
def test_inspect_and_ls_accept_a_file_of_the_checkpoint(sharded):
    prefix = str(sharded / "model.ckpt")
    for path in (prefix, prefix + ".index", prefix + ".data-00000-of-00002", prefix + ".data-00001-of-00002"):
        code, out, err = main("inspect", path)
        assert code == 0, err
        assert out.splitlines()[0] == f"checkpoint: {prefix}  (2 data file(s))"
        assert "b  int32  [5]" in out
        code, out, err = main("ls", path)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == f"checkpoint: {prefix}"
        names = [line.split()[0] for line in lines[1:-1]]
        assert names == [
            "model.ckpt.index",
            "model.ckpt.data-00000-of-00002",
            "model.ckpt.data-00001-of-00002",
        ]
        total = sum(os.path.getsize(sharded / n) for n in names)
        assert lines[-1] == f"  3 file(s), {total} B"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # TF's tool takes one too
        assert _inspect.main(["--file_name", prefix + ".index", "--tensor_name", "b"]) == 0
    assert out.getvalue().startswith("tensor_name:  b (int32) [5]")
    proc = command("inspect", prefix + ".data-00001-of-00002", "--tensor", "b", "--values")
    assert proc.returncode == 0, proc.stderr
    assert "b  int32  [5]" in proc.stdout


def test_files_of_saves_that_never_committed_are_clear_errors(sharded):
    d = str(sharded)
    cases = {
        f"{d}/m.data-00000-of-00001.0123456789abcdef.staged": ("staged data file", "'shardsave gc'"),
        f"{d}/model.ckpt.index.0123456789abcdef.pending": ("commit journal", "model.ckpt"),
        f"{d}/model.ckpt.index.tmp0af3": ("temp file of an interrupted publish",),
        f"{d}/orphan.data-00000-of-00001": ("which has no index", f"{d}/orphan.index", "'shardsave gc'"),
        f"{d}/nothing.index": ("no such checkpoint index",),
    }
    for path, needles in cases.items():
        Path(path).write_bytes(b"x" * 10) if not path.endswith("nothing.index") else None
        for cmd in ("inspect", "ls", "verify"):
            code, out, err = main(cmd, path)
            lines = err.strip().splitlines()
            assert code == 1 and len(lines) == 1, (cmd, path, err)
            assert lines[0].startswith(f"shardsave {cmd}: error: {path}")
            for needle in needles:
                assert needle in lines[0], (needle, lines[0])
        code, _, err = main("diff", path, f"{d}/model.ckpt")
        assert code == 2 and "error:" in err


# ------------------------------------------------------------------ ls
def test_human_sizes():
    assert [cli.human_size(n) for n in (0, 1023, 1024, 1536 * 1024, 5 << 30, 3 << 50)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 MiB",
        "5.0 GiB",
        "3.0 PiB",
    ]


def test_ls_prints_human_sizes_and_exits_1_for_what_is_missing(tmp_path):
    with ss.Graph().as_default():
        ss.Variable("w", np.zeros(393216, np.float32))  # 1.5 MiB
        saver = ss.Saver()
        for step in (1, 2):
            saver.save(str(tmp_path / "run" / "ckpt"), global_step=step)
    code, out, err = main("ls", str(tmp_path / "run"))
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert [r.split()[:4] for r in rows] == [["ckpt-1", "1", "1.5", "MiB"], ["ckpt-2", "2", "1.5", "MiB"]]
    assert rows[-1].endswith("(latest)")
    for missing, why in (
        (tmp_path / "nope", "no such directory"),
        (tmp_path / "run" / "ckpt-3", "no such directory"),
        (tmp_path / "run" / "checkpoint", "not a directory or checkpoint"),
    ):
        code, out, err = main("ls", str(missing))
        assert (code, out) == (1, "") and err.strip() == f"shardsave ls: error: {missing}: {why}"
    proc = command("ls", str(tmp_path / "nope"))
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"shardsave ls: error: {tmp_path / 'nope'}: no such directory"
    (tmp_path / "empty").mkdir()
    assert main("ls", str(tmp_path / "empty")) == (0, f"no checkpoints in {tmp_path / 'empty'}\n", "")


# ------------------------------------------------------------------ verify
def test_verify_passes_tensorflows_checkpoints_and_our_own(standard, tmp_path):
    for d in sorted(TF_DATA.iterdir()):
        if d.is_dir():
            code, out, err = main("verify", str(d))
            assert code == 0 and err == "", err
            assert out.startswith(f"OK {d}/") and " checked in " in out
    code, out, err = main("verify", standard)
    assert code == 0, err
    assert out.startswith(f"OK {standard}: 4 tensor(s), 1 data file(s), 2.0 MiB checked in ")
    with ss.Graph().as_default():
        ss.Variable("w", np.arange(5.0))
        saver = ss.Saver(max_to_keep=5)
        prefixes = [saver.save(str(tmp_path / "run" / "ckpt"), global_step=s) for s in (1, 2, 3)]
    code, out, _ = main("verify", str(tmp_path / "run"))  # a directory: its latest
    assert code == 0 and out.count("OK ") == 1 and out.startswith(f"OK {prefixes[-1]}:")
    code, out, _ = main("verify", str(tmp_path / "run"), "--all")
    assert code == 0 and [line.split()[1][:-1] for line in out.splitlines()] == prefixes
    os.remove(tmp_path / "run" / "checkpoint")  # no state file: the newest listed
    code, out, _ = main("verify", str(tmp_path / "run"))
    assert code == 0 and out.startswith(f"OK {prefixes[-1]}:")


def damage_lines(code: int, out: str, err: str) -> list[str]:
    assert code == 1 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("shardsave verify: ") and " is DAMAGED: " in lines[-1]
    return lines


def test_verify_names_every_damaged_tensor_its_file_and_what_was_expected(crafted):
    data = crafted.data_file(0)
    flip(data, crafted.get("small").offset + 3)  # one CRC over the entry
    flip(data, crafted.get(EMB_PIECE).offset + 700_000)  # per-block CRCs: the block is named
    flip(data, crafted.get("s").offset + crafted.get("s").size - 1)  # a string's text
    lines = damage_lines(*main("verify", crafted.prefix))
    assert len(lines) == 4
    damaged = {line.split("tensor ")[1].split()[0].strip("':,") for line in lines[:3]}
    assert damaged == {"small", "emb", "s"}
    for line in lines[:3]:
        assert line.startswith(f"shardsave verify: damaged: {data}: ")
        assert "checksum does not match" in line and "stored 0x" in line and "vs. calculated 0x" in line
    emb = next(line for line in lines if "'emb'" in line)
    block = (crafted.get(EMB_PIECE).offset + 700_000) // 65536 * 65536
    assert f"(bytes {block}.." in emb
    assert lines[-1].endswith("3 problem(s), 3 of 4 tensor(s) damaged: 'emb', 's', 'small'")


def test_verify_checks_the_entry_crc_a_restore_by_blocks_never_reads(crafted):
    """TensorFlow checks an entry's one CRC; shardsave's restore its block CRCs: a checkpoint
    with a wrong entry CRC restores here but not in TF, and verify says so."""
    e = crafted.get(EMB_PIECE)
    crafted.set(EMB_PIECE, crc32c=e.crc32c ^ 1).save()
    ss.CheckpointReader(crafted.prefix).get_tensor("emb")  # the restore layer reads it fine
    lines = damage_lines(*main("verify", crafted.prefix))
    assert len(lines) == 2 and "'emb'" in lines[0]
    assert f"(offset {e.offset}, {e.size} bytes): stored {e.crc32c ^ 1:#010x}" in lines[0]


@pytest.mark.parametrize(
    "case, needles",
    [
        ("truncated", ["file too short for tensor 'small2'", "past the end of the file"]),
        ("appended", ["data file is", "2 bytes more than the index accounts for"]),
        ("missing", ["not found (the data file of tensor"]),
        ("index byte", [".index is not a valid checkpoint index"]),
        ("dtype 99", ["tensor 'small' has dtype 99"]),
        ("offset 2**63", ["tensor 'small'", "out of range"]),
        ("block size 1 GiB", ["crc32c_block_size of 1073741824 bytes"]),
        ("shape [-3]", ["tensor 'small' has shape [-3]"]),
    ],
)
def test_verify_of_a_damaged_or_hostile_checkpoint_is_a_clear_error(crafted, case, needles):
    data = crafted.data_file(0)
    if case == "truncated":
        data.write_bytes(data.read_bytes()[:-10])
    elif case == "appended":
        data.write_bytes(data.read_bytes() + b"xx")
    elif case == "missing":
        data.unlink()
    elif case == "index byte":
        flip(Path(crafted.prefix + ".index"), 20)
    elif case == "dtype 99":
        crafted.set("small", dtype=99).save()
    elif case == "offset 2**63":
        crafted.set("small", offset=1 << 63).save()
    elif case == "block size 1 GiB":
        crafted.set(EMB_PIECE, block_size=1 << 30).save()
    elif case == "shape [-3]":
        crafted.set("small", shape=(-3,)).save()
    code, out, err = main("verify", crafted.prefix)
    assert code == 1 and out == "" and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    last = err.strip().splitlines()[-1]
    if case in ("index byte", "offset 2**63"):  # the index does not parse: nothing else to check
        assert last.startswith(f"shardsave verify: error: {crafted.prefix}.index is not a valid")
    else:
        assert last.startswith(f"shardsave verify: {crafted.prefix} is DAMAGED")


def test_verify_streams_in_bounded_chunks(crafted):
    """A 2 MiB checkpoint checked 128 KiB at a time holds a few chunks, never a tensor,
    and still finds a flipped byte in the last block of a piece."""
    loc = storage.resolve(crafted.prefix)
    _verify.verify_checkpoint(loc, chunk_bytes=128 << 10)  # imports and CRC tables, once
    tracemalloc.start()
    try:
        report = _verify.verify_checkpoint(loc, chunk_bytes=128 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and report.bytes_checked > 2 << 20
    assert peak < _verify.PARALLEL * (128 << 10) + (128 << 10), peak
    e = crafted.get(EMB_PIECE)
    flip(crafted.data_file(0), e.offset + e.size - 1)
    report = _verify.verify_checkpoint(loc, chunk_bytes=128 << 10)
    assert report.damaged_tensors == {"emb"} and f"(bytes {e.offset + e.size - 65536}.." in report.damage[0]


def test_verify_as_a_user_runs_it_with_a_progress_bar_only_on_a_terminal(crafted):
    assert main("verify", crafted.prefix)[2] == ""  # stderr not a terminal: no bar
    primary, replica = pty.openpty()  # stderr a terminal: the bar is drawn there, stdout stays clean
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-m", "shardsave.cli", "verify", crafted.prefix],
            stdout=subprocess.PIPE,
            stderr=replica,
            env=env,
            timeout=60,
        )
        os.close(replica)
        tty = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(primary, 4096):
                tty += chunk
    finally:
        os.close(primary)
    assert proc.returncode == 0 and proc.stdout.startswith(b"OK ")
    assert b"100.0%" in tty and b"[##############################]" in tty
    flip(crafted.data_file(0), crafted.get("small").offset)
    proc = command("verify", crafted.prefix)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "damaged" in proc.stderr and "'small'" in proc.stderr


def test_verify_on_s3(s3_server, s3_dir):
    opts = s3_server.options()
    with ss.Graph().as_default():
        ss.Variable("big", np.arange(300_000, dtype=np.float32))
        ss.Variable("small", np.arange(4.0))
        ss.Variable("empty", np.zeros((0, 3), np.float32))  # no bytes: no request either
        prefix = ss.Saver(storage_options=opts).save(f"{s3_dir}/ckpt", global_step=7)
    proc = command("verify", s3_dir, env=s3_server.env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK {prefix}: 3 tensor(s), 1 data file(s), 1.1 MiB checked")
    data = storage.resolve(prefix + ".data-00000-of-00001", opts)
    blob = bytearray(storage.read_bytes(data))
    blob[500_000] ^= 1
    storage.remove([data])
    storage.publish(data, bytes(blob))
    import json

    code, out, err = main("--storage-options", json.dumps(opts), "verify", s3_dir, "--all")
    lines = damage_lines(code, out, err)
    assert lines[0].startswith(
        f"shardsave verify: damaged: {data.url}: checksum does not match for tensor 'big'"
    )
    code, out, err = main("--storage-options", json.dumps(opts), "ls", prefix + ".data-00000-of-00001")
    assert code == 0 and out.splitlines()[0] == f"checkpoint: {prefix}" and "1.1 MiB" in out, err
    code, out, err = main("--storage-options", json.dumps(opts), "verify", f"{s3_dir}/nothing")
    assert code == 1 and "no such directory or checkpoint" in err


# ------------------------------------------------------------------ diff
def _save(path: str, values: dict) -> str:
    return ss.Saver([ss.Variable(n, v, register=False) for n, v in values.items()]).save(path)


def test_diff_lists_what_differs_and_exits_like_diff(tmp_path):
    common = {
        "same": np.arange(6.0).reshape(2, 3),
        "nan": np.array([np.nan, 1.0, -0.0]),
        "text": np.array([b"a", b"b"], dtype=object),
    }
    a = _save(
        str(tmp_path / "a" / "m"),
        {
            **common,
            "gone": np.zeros(3, np.int32),
            "shape": np.zeros((2, 3)),
            "dtype": np.zeros(3, np.float32),
            "vals": np.arange(1000, dtype=np.float32),
            "ints": np.array([np.iinfo(np.int64).min, 0], np.int64),
            "words": np.array([b"x", b"y", b"z"], dtype=object),
        },
    )
    changed = np.arange(1000, dtype=np.float32)
    changed[[5, 500]] += [0.25, -1.5]
    b = _save(
        str(tmp_path / "b" / "m"),
        {
            **{**common, "nan": np.array([np.nan, 1.0, 0.0])},
            "new": np.ones((4, 4), np.float16),
            "shape": np.zeros((3, 2)),
            "dtype": np.zeros(3, np.float64),
            "vals": changed,
            "ints": np.array([np.iinfo(np.int64).max, 0], np.int64),
            "words": np.array([b"x", b"Y", b"z"], dtype=object),
        },
    )
    code, out, err = main("diff", a, str(tmp_path / "b"))  # a prefix and a directory
    assert code == 1 and err == "", err
    assert out.splitlines() == [
        "dtype differs: dtype  float32 vs. float64",
        "only in A: gone  int32  [3]",
        "only in B: new  float16  [4, 4]",
        "shape differs: shape  [2, 3] vs. [3, 2]",
        f"4 difference(s) between A {a} and B {b}",
    ]
    code, out, err = main("diff", "--values", a + ".index", b + ".data-00000-of-00001")
    assert code == 1, err
    lines = out.splitlines()
    assert "values differ: vals  max abs difference 1.5 (2 of 1000 element(s) differ)" in lines
    assert f"values differ: ints  max abs difference {2**64 - 1} (1 of 2 element(s) differ)" in lines
    assert "values differ: words  1 of 3 string(s) differ" in lines
    assert not any(" same " in line or " nan " in line or " text " in line for line in lines)  # NaN == NaN
    assert lines[-1].startswith("7 difference(s)")
    assert main("diff", "--values", a, a) == (0, "", "")
    proc = command("diff", a, str(tmp_path / "missing"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("shardsave diff: error: no checkpoint found at")


def test_diff_of_a_damaged_checkpoint_is_an_error_not_a_difference(crafted, standard):
    assert main("diff", "--values", crafted.prefix, standard) == (0, "", "")
    flip(crafted.data_file(0), crafted.get("small").offset)
    assert main("diff", crafted.prefix, standard) == (0, "", "")  # the indexes alone agree
    code, out, err = main("diff", "--values", crafted.prefix, standard)
    assert code == 2 and "checksum does not match for tensor 'small'" in err


def test_diff_compares_a_large_tensor_a_slab_at_a_time(tmp_path, monkeypatch):
    """Above CHUNK_BYTES, a tensor whose entries have block CRCs is read in row slabs (each
    reads only its blocks) and the slabs' counts and maxima add up; a TF-style entry with
    one CRC is read whole."""
    from shardsave import _diff
    from shardsave.reader import CheckpointReader

    big = np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024)  # 2 MiB, 32 blocks of 64 KiB
    other = big.copy()
    other[3, 7] += 2.0
    other[500, 1] -= 0.5
    other[501, :4] = np.nan
    a, b = _save(str(tmp_path / "a" / "m"), {"big": big}), _save(str(tmp_path / "b" / "m"), {"big": other})
    whole = _diff.value_difference(big, other)
    assert whole == "max abs difference nan (6 of 524288 element(s) differ)"
    slices = []
    real = CheckpointReader.get_slice
    monkeypatch.setattr(CheckpointReader, "get_slice", lambda r, n, i: slices.append(i) or real(r, n, i))
    monkeypatch.setattr(_diff, "CHUNK_BYTES", 256 << 10)
    code, out, _ = main("diff", "--values", a, b)
    assert code == 1 and out.splitlines()[0] == f"values differ: big  {whole}"
    assert len(slices) == 2 * 8 and slices[0] == slice(0, 64)
    other[501, :4] = big[501, :4]
    b = _save(str(tmp_path / "c" / "m"), {"big": other})
    code, out, _ = main("diff", "--values", a, b)
    assert out.splitlines()[0] == "values differ: big  max abs difference 2 (2 of 524288 element(s) differ)"
    slices.clear()
    monkeypatch.setattr(_diff, "CHUNK_BYTES", 32)  # TF's [3, 4] tensors are larger, with one CRC each
    assert main("diff", "--values", str(TF_DATA / "v1_saver"), str(TF_DATA / "v1_saver"))[0] == 0
    assert slices == []  # read whole
