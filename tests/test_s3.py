"""S3 as a first-class target, against a real S3 server on loopback (moto's, see
conftest.py): the storage layer's contract on local files, memory:// and S3 alike; the
Saver, the reading functions and the CLI on s3:// URLs; errors (missing bucket, access
denied, throttling and dropped connections); and multi-rank jobs under mpiexec.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from faults.common import REPO, run_mpi
from storage_helpers import glob

import shardsave as ss
from shardsave import cli, storage
from shardsave.errors import FailedPreconditionError, NotFoundError, PermissionDeniedError


@pytest.fixture(autouse=True)
def fresh_graph():
    ss.reset_default_graph()


# ------------------------------------------------------------------ storage contract
@pytest.fixture(params=["local", "memory", "s3"])
def base(request, tmp_path):
    """(directory URL, storage options) on each kind of storage."""
    if request.param == "local":
        return str(tmp_path), None
    if request.param == "memory":
        return f"memory://{request.node.name}-{os.getpid()}", None
    server = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_dir"), server.options()


def test_storage_contract(base, monkeypatch):
    url, options = base
    d = storage.resolve(url, options)
    storage.makedirs(d)
    a = d.child("a.bin")
    assert not storage.exists(a) and storage.size(a) is None
    assert storage.read_bytes(a, missing_ok=True) is None
    with pytest.raises(NotFoundError, match=re.escape(a.url)):
        storage.read_bytes(a)

    monkeypatch.setattr(storage.s3, "PART_BYTES", 5 << 20)  # S3's smallest part
    data = np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8)
    w = storage.Writer(a, fsync=False)
    w.write(data[:100])
    w.write(memoryview(data)[100:])  # one large buffer: several parts on S3
    w.close()
    assert w.written == data.size == storage.size(a) == storage.info(a)["size"]
    assert storage.exists(a)
    bufs = [np.empty(n, np.uint8) for n in (10, 3 << 20, 7)]
    offsets = [0, 5 << 20, data.size - 7]
    storage.read_ranges(a, [(o, memoryview(b)) for o, b in zip(offsets, bufs, strict=True)])
    for o, b in zip(offsets, bufs, strict=True):
        assert b.tobytes() == data[o : o + b.size].tobytes()

    # an aborted write leaves nothing behind where the store can promise it (S3)
    if d.is_s3:
        w = storage.Writer(d.child("aborted.bin"))
        w.write(data)
        w.abort()
        assert not storage.exists(d.child("aborted.bin"))
        assert storage.pending_uploads(d) == []

    idx = d.child("m.index")
    storage.publish(idx, b"one", fsync=False, exclusive=True)
    assert storage.read_bytes(idx) == b"one"
    if not d.is_local:  # create-only where the store supports it
        with pytest.raises(FailedPreconditionError, match="another job"):
            storage.publish(idx, b"two", exclusive=True)
        assert storage.read_bytes(idx) == b"one"
    storage.publish(idx, b"three", fsync=False)
    assert storage.read_bytes(idx) == b"three"

    assert [f.name for f in glob(d, "*")] == ["a.bin", "m.index"]
    assert [(f.name, i["size"]) for f, i in storage.scan(d, "*.index")] == [("m.index", 5)]
    storage.remove([a, d.child("never-existed")])
    assert [f.name for f in glob(d, "*")] == ["m.index"]
    assert glob(d.child("no-such-dir"), "*") == []


# ------------------------------------------------------------------ single process
def model(step: int):
    """Variables of every kind, with values that depend on ``step``."""
    ss.reset_default_graph()
    rng = np.random.default_rng(step)
    return {
        "w": ss.Variable("w", rng.standard_normal((20, 30)).astype(np.float32)),
        "b": ss.Variable("b", np.arange(5, dtype=np.int64) * step),
        "s": ss.Variable("s", np.array([b"x", b"", b"step %d" % step], dtype=object)),
        "t": ss.get_variable(
            "t",
            [10, 4],
            np.float64,
            partitioner=ss.fixed_size_partitioner(4),
            initializer=rng.standard_normal((10, 4)),
        ),
    }


def refill(variables, step: int) -> None:
    """Give existing variables the values ``model(step)`` would have."""
    graph = ss.get_default_graph()
    with ss.Graph().as_default():
        new = model(step)
    for k, v in variables.items():
        for part, src in zip(getattr(v, "parts", [v]), getattr(new[k], "parts", [new[k]]), strict=True):
            part.assign(src.value)
    assert ss.get_default_graph() is graph


def values(variables) -> dict:
    return {k: np.array(v.value, copy=True) for k, v in variables.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype == object:
            assert list(a[k]) == list(b[k]), k
        else:
            assert a[k].tobytes() == b[k].tobytes(), k


def blank(variables) -> None:
    for v in variables.values():
        for part in getattr(v, "parts", [v]):
            part._value = None


def test_save_restore_retention_and_state(s3_server, s3_dir):
    opts = s3_server.options()
    saved = {}
    variables = model(1)
    saver = ss.Saver(max_to_keep=2, storage_options=opts)
    for step in (1, 2, 3):
        refill(variables, step)
        saved[step] = values(variables)
        assert saver.save(f"{s3_dir}/model.ckpt", global_step=step) == f"{s3_dir}/model.ckpt-{step}"
    key = s3_dir.split("/", 3)[3]
    # retention deleted step 1's objects on the server
    assert [k.split("/")[-1] for k in s3_server.keys(key + "/")] == [
        "checkpoint",
        "model.ckpt-2.data-00000-of-00001",
        "model.ckpt-2.index",
        "model.ckpt-3.data-00000-of-00001",
        "model.ckpt-3.index",
    ]
    state = ss.get_checkpoint_state(s3_dir, storage_options=opts)
    assert state.model_checkpoint_path == f"{s3_dir}/model.ckpt-3"
    assert state.all_model_checkpoint_paths == [f"{s3_dir}/model.ckpt-2", f"{s3_dir}/model.ckpt-3"]
    assert ss.latest_checkpoint(s3_dir, storage_options=opts) == f"{s3_dir}/model.ckpt-3"
    assert ss.checkpoint_exists(f"{s3_dir}/model.ckpt-2", storage_options=opts)
    assert not ss.checkpoint_exists(f"{s3_dir}/model.ckpt-1", storage_options=opts)

    for step in (2, 3):
        variables = model(99)
        blank(variables)
        ss.Saver(storage_options=opts).restore(f"{s3_dir}/model.ckpt-{step}")
        assert_same(values(variables), saved[step])


def test_reshard_on_restore(s3_server, s3_dir):
    """Saved in 4 slices, restored into 3 and into one whole variable."""
    opts = s3_server.options()
    whole = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
    ss.get_variable("t", [10, 7], partitioner=ss.fixed_size_partitioner(4), initializer=whole)
    ss.Saver(storage_options=opts).save(f"{s3_dir}/m")
    ss.reset_default_graph()
    t3 = ss.get_variable("t", [10, 7], partitioner=ss.fixed_size_partitioner(3))
    ss.Saver(storage_options=opts).restore(f"{s3_dir}/m")
    assert np.array_equal(t3.value, whole)
    ss.reset_default_graph()
    t1 = ss.Variable("t", dtype=np.float32, shape=(10, 7))
    ss.Saver(storage_options=opts).restore(f"{s3_dir}/m")
    assert np.array_equal(t1.value, whole)


def test_reshard_by_columns_reads_slabs_of_rows(s3_server, s3_dir, monkeypatch):
    """From an object store a column reshard gets new arrays, filled a slab of rows per
    ranged GET (each slab checked), not from one buffer as large as the stored tensor."""
    from shardsave.restore import slabs

    opts = s3_server.options()
    monkeypatch.setattr(slabs, "SLAB_BYTES", 1 << 20)
    full = np.random.default_rng(2).standard_normal((512, 2048)).astype(np.float32)  # 4 MiB
    ss.Saver([ss.Variable("w", full, register=False)], storage_options=opts).save(f"{s3_dir}/m")
    halves = [
        ss.Variable(
            "w", np.zeros((512, 1024), np.float32), global_shape=full.shape, offset=(0, c), register=False
        )
        for c in (0, 1024)
    ]
    saver = ss.Saver({"w": halves}, storage_options=opts)
    saver.restore(f"{s3_dir}/m")
    for v, c in zip(halves, (0, 1024), strict=True):
        assert np.array_equal(v.value, full[:, c : c + 1024])
    stats = saver.last_restore_stats
    assert stats.requests >= 2 * 4  # 4 slabs of 128 rows for each half
    assert stats.bytes_read <= 2 * full.nbytes * 1.05


def test_large_variable_goes_up_in_parts_and_reads_only_ranges(s3_server, s3_dir, monkeypatch):
    opts = s3_server.options()
    monkeypatch.setattr(storage.s3, "PART_BYTES", 5 << 20)
    big = np.random.default_rng(1).standard_normal((1600, 2048)).astype(np.float32)  # 13 MB
    ss.Variable("big", big)
    ss.Saver(storage_options=opts).save(f"{s3_dir}/m")
    d = storage.resolve(f"{s3_dir}/m.data-00000-of-00001", opts)
    assert d.fs.info(d.path, refresh=True)["ETag"].strip('"').endswith("-3")  # a 3-part upload
    reader = ss.CheckpointReader(f"{s3_dir}/m", storage_options=opts)
    assert np.array_equal(reader.get_slice("big", (slice(100, 110), slice(None))), big[100:110])
    assert reader.bytes_read < big.nbytes // 10
    assert np.array_equal(reader.get_tensor("big"), big)


def test_non_blocking_save_to_s3(s3_server, s3_dir):
    opts = s3_server.options()
    variables = model(6)
    want = values(variables)
    handle = ss.Saver(storage_options=opts).save(f"{s3_dir}/m", global_step=6, blocking=False)
    variables["w"].value[:] = 0  # training goes on while the upload runs in the background
    assert handle.result(timeout=60) == f"{s3_dir}/m-6"
    assert ss.load_variable(s3_dir, "w", storage_options=opts).tobytes() == want["w"].tobytes()


def test_reading_functions_and_ready_filesystem(s3_server, s3_dir, capsys):
    opts = s3_server.options()
    variables = model(5)
    want = values(variables)
    ss.Saver(storage_options=opts).save(f"{s3_dir}/model.ckpt", global_step=5)
    prefix = f"{s3_dir}/model.ckpt-5"
    fs = storage.resolve(s3_dir, opts).fs
    for kw in ({"storage_options": opts}, {"fs": fs}):
        for where in (prefix, s3_dir):  # a prefix, or a directory through its state file
            assert ss.list_variables(where, **kw) == [("b", [5]), ("s", [3]), ("t", [10, 4]), ("w", [20, 30])]
            assert np.array_equal(ss.load_variable(where, "t", **kw), want["t"])
        reader = ss.CheckpointReader(prefix, **kw)
        assert reader.has_tensor("w") and not reader.has_tensor("nope")
        assert list(reader.get_tensor("s")) == list(want["s"])
        assert reader.get_tensor("w").tobytes() == want["w"].tobytes()
        assert b"w (DT_FLOAT) [20, 30]" in reader.debug_string()
        assert ss.latest_checkpoint(s3_dir, **kw) == prefix
    ss.print_tensors_in_checkpoint_file(prefix, tensor_name="b", all_tensors=False, storage_options=opts)
    assert "[ 0  5 10 15 20]" in capsys.readouterr().out
    ss.reset_default_graph()
    b = ss.Variable("b", dtype=np.int64, shape=(5,))
    ss.Saver({"b": b}, fs=fs).restore(prefix)
    assert np.array_equal(b.value, want["b"])


def test_latest_checkpoint_sees_what_other_processes_wrote(s3_server, s3_dir):
    """This process lists the directory (s3fs caches the listing); another client then
    commits a checkpoint and rewrites a file; this process must see both."""
    opts = s3_server.options()
    model(1)
    ss.Saver(storage_options=opts).save(f"{s3_dir}/m", global_step=1)
    d = storage.resolve(s3_dir, opts)
    d.fs.ls(d.path)  # s3fs caches this listing
    assert ss.latest_checkpoint(s3_dir, storage_options=opts) == f"{s3_dir}/m-1"
    data_1 = d.child("m-1.data-00000-of-00001")
    assert storage.size(data_1) == len(d.fs.cat_file(data_1.path)) > 0  # a GET: no cached listing

    import s3fs

    other = s3fs.S3FileSystem(
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": s3_server.endpoint},
        key=opts["key"],
        secret=opts["secret"],
    )
    model(2)
    ss.Saver(fs=other).save(f"{s3_dir}/m", global_step=2)
    other.pipe_file(d.child("m-1.data-00000-of-00001").path, b"12345")
    assert ss.latest_checkpoint(s3_dir, storage_options=opts) == f"{s3_dir}/m-2"
    data_2 = d.child("m-2.data-00000-of-00001")
    assert storage.size(data_2) == len(d.fs.cat_file(data_2.path)) > 0  # a GET: no cached listing
    assert storage.size(d.child("m-1.data-00000-of-00001")) == 5
    assert "m-2.index" in [f.name for f in glob(d, "*.index")]


def test_missing_bucket_fails_fast_and_is_not_created(s3_server):
    opts = s3_server.options()
    url = "s3://no-such-bucket-shardsave/run"
    model(1)
    start = time.monotonic()
    with pytest.raises(
        NotFoundError,
        match=r"s3://no-such-bucket-shardsave/run.*bucket 'no-such-bucket-shardsave' does not exist",
    ):
        ss.Saver(storage_options=opts).save(f"{url}/m")
    with pytest.raises(NotFoundError, match="no-such-bucket-shardsave.*does not exist"):
        ss.latest_checkpoint(url, storage_options=opts)
    with pytest.raises(NotFoundError, match=f"{url}/m"):
        ss.CheckpointReader(f"{url}/m", storage_options=opts)
    with pytest.raises(NotFoundError, match="does not exist"):
        glob(storage.resolve(url, opts), "*")
    assert time.monotonic() - start < 10
    assert "no-such-bucket-shardsave" not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert cli.main(["--storage-options", json.dumps(opts), "ls", url]) == 1


def test_access_denied_fails_fast_naming_the_url(s3_server, s3_dir):
    opts = s3_server.options()
    model(1)
    ss.Saver(storage_options=opts).save(f"{s3_dir}/m", global_step=1)
    iam = s3_server.client("iam")
    user = f"nobody-{os.urandom(4).hex()}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    denied = dict(opts, key=key["AccessKeyId"], secret=key["SecretAccessKey"])
    s3_server.set_auth(True)
    try:
        start = time.monotonic()
        with pytest.raises(PermissionDeniedError, match=re.escape(f"{s3_dir}/checkpoint")):
            ss.latest_checkpoint(s3_dir, storage_options=denied)
        with pytest.raises(PermissionDeniedError, match=re.escape(f"{s3_dir}/m-1")):
            ss.CheckpointReader(f"{s3_dir}/m-1", storage_options=denied)
        with pytest.raises(PermissionDeniedError, match=re.escape(s3_dir)):
            ss.Saver(storage_options=denied).save(f"{s3_dir}/m", global_step=2)
        assert time.monotonic() - start < 10
    finally:
        s3_server.set_auth(False)
    assert ss.latest_checkpoint(s3_dir, storage_options=opts) == f"{s3_dir}/m-1"


def test_transient_errors_are_retried(s3_server, s3_dir):
    """503 SlowDown answers and connections dropped without an answer (two in a row: aiohttp
    silently reconnects once) in the middle of a save and a restore."""
    from s3server import FaultProxy

    proxy = FaultProxy(s3_server.endpoint)
    try:
        opts = s3_server.options(endpoint=proxy.endpoint)
        variables = model(3)
        want = values(variables)
        proxy.faults = [None, "503", None, "drop", "drop"]
        ss.Saver(storage_options=opts).save(f"{s3_dir}/m", global_step=3)
        assert proxy.faults == []
        proxy.faults = [None, "drop", "drop", None, "503"]
        blank(variables)
        ss.Saver(storage_options=opts).restore(ss.latest_checkpoint(s3_dir, storage_options=opts))
        assert_same(values(variables), want)
        assert proxy.faults == [] and proxy.injected.count("503") == 2 and proxy.injected.count("drop") == 4
    finally:
        proxy.stop()


def test_standard_aws_environment_alone(s3_server, s3_dir, monkeypatch, capsys):
    """AWS_ENDPOINT_URL and the key variables, no storage options: as deploy/ runs it."""
    model(4)
    ss.Saver(storage_options=s3_server.options()).save(f"{s3_dir}/model.ckpt", global_step=4)
    env = s3_server.env()
    for k in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.setenv(k, env[k])
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "_cache", {})  # a new instance reads the environment
    assert ss.latest_checkpoint(s3_dir) == f"{s3_dir}/model.ckpt-4"
    env.pop("SHARDSAVE_STORAGE_OPTIONS", None)
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "shardsave"), "ls", s3_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"model\.ckpt-4 +4 +[\d.]+ (B|KiB) .*\(latest\)", proc.stdout), proc.stdout


# ------------------------------------------------------------------ command line
def test_cli_with_flag_and_environment(s3_server, s3_dir, monkeypatch, capsys):
    opts = s3_server.options()
    variables = model(1)
    saver = ss.Saver(storage_options=opts)
    for step in (1, 2):
        refill(variables, step)
        saver.save(f"{s3_dir}/model.ckpt", global_step=step)
    d = storage.resolve(s3_dir, opts)
    storage.publish(d.child("model.ckpt-3.data-00000-of-00002"), b"orphan")
    flag = ["--storage-options", json.dumps(opts)]

    assert cli.main(flag + ["ls", s3_dir]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\.ckpt-1 +1 ", out) and re.search(r"model\.ckpt-2 +2 .*\(latest\)", out)
    assert "model.ckpt-3" not in out
    assert cli.main(["inspect", s3_dir, "--tensor", "b", "--values"] + flag) == 0  # flag after the command
    out = capsys.readouterr().out
    assert (
        "checkpoint: " + f"{s3_dir}/model.ckpt-2" in out and "b  int64  [5]" in out and "[0 2 4 6 8]" in out
    )

    monkeypatch.setenv("SHARDSAVE_STORAGE_OPTIONS", json.dumps(opts))
    assert cli.main(["gc", s3_dir, "--dry-run"]) == 0
    assert f"would delete {s3_dir}/model.ckpt-3.data-00000-of-00002" in capsys.readouterr().out
    assert cli.main(["gc", s3_dir]) == 0
    out = capsys.readouterr().out
    assert (
        f"deleting {s3_dir}/model.ckpt-3.data-00000-of-00002" in out and "1 leftover file(s) deleted" in out
    )
    assert not storage.exists(d.child("model.ckpt-3.data-00000-of-00002"))
    assert cli.main(["inspect", f"{s3_dir}/model.ckpt-1"]) == 0
    assert "# Total number of params: 648" in capsys.readouterr().out

    monkeypatch.setenv("SHARDSAVE_STORAGE_OPTIONS", "{not json")
    assert cli.main(["ls", s3_dir]) == 1
    assert "not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------ under mpiexec
TRAIN = os.path.join(REPO, "examples", "mpi_train.py")
SHA = re.compile(r"final step (\d+) parameters sha256 ([0-9a-f]{64})")


def train(n: int, ckpt_dir: str, steps: int, *extra: str, env=None) -> str:
    proc = run_mpi(
        n,
        [
            TRAIN,
            "--ckpt-dir",
            ckpt_dir,
            "--steps",
            str(steps),
            "--save-every",
            "20",
            "--max-to-keep",
            "2",
            *extra,
        ],
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = SHA.search(proc.stdout)
    assert m and int(m.group(1)) == steps, proc.stdout
    return proc.stdout


def test_mpi_training_checkpoints_to_s3_and_resumes_on_fewer_ranks(s3_server, s3_dir, tmp_path):
    opts = json.dumps(s3_server.options())
    env = s3_server.env()
    out4 = train(4, s3_dir, 40, "--storage-options", opts, env=env)
    assert f"saved {s3_dir}/model.ckpt-40" in out4
    key = s3_dir.split("/", 3)[3]
    assert [k.split("/")[-1] for k in s3_server.keys(key + "/") if ".data-" in k] == [
        f"model.ckpt-{s}.data-{r:05d}-of-00004" for s in (20, 40) for r in range(4)
    ]
    # resume on 3 ranks from the environment alone (AWS_ENDPOINT_URL), as deploy/ does
    out3 = train(3, s3_dir, 60, "--resume", env=env)
    assert f"resumed from {s3_dir}/model.ckpt-40 at step 40 on 3 ranks" in out3
    straight = train(1, str(tmp_path / "straight"), 60, "--dump", str(tmp_path / "straight.npz"), env=env)
    assert SHA.search(out3).group(2) == SHA.search(straight).group(2)
    # retention on S3 with several ranks: step 20 went when step 60 came
    names = [k.split("/")[-1] for k in s3_server.keys(key + "/")]
    assert [n for n in names if n.endswith(".index")] == ["model.ckpt-40.index", "model.ckpt-60.index"]
    assert not [n for n in names if n.startswith("model.ckpt-20.")]
    assert sorted(n for n in names if n.startswith("model.ckpt-60.data")) == [
        f"model.ckpt-60.data-{r:05d}-of-00003" for r in range(3)
    ]
    # and this process reads what 3 ranks wrote
    reader = ss.CheckpointReader(s3_dir, storage_options=json.loads(opts))
    assert reader.prefix == f"{s3_dir}/model.ckpt-60" and reader.num_shards == 3
    emb = reader.get_tensor("embedding")
    assert emb.shape == (1000, 32)
    # the one-rank run that went straight to step 60 ends with the same bits
    np.testing.assert_array_equal(
        emb.view(np.uint32), np.load(tmp_path / "straight.npz")["embedding"].view(np.uint32)
    )


def test_memory_filesystem_from_several_processes_fails_at_commit():
    proc = run_mpi(
        2, [TRAIN, "--ckpt-dir", "memory://shardsave-unshared", "--steps", "1", "--save-every", "1"]
    )
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert re.search("memory:///?shardsave-unshared/model.ckpt-1.data-00001-of-00002", err), err[-3000:]
    assert "same shared filesystem" in err and "memory://" in err, err[-3000:]


def test_unreachable_endpoint_is_unavailable_error_naming_the_url():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "k",
        "secret": "s",
        "config_kwargs": {"retries": {"max_attempts": 2}},
    }
    with pytest.raises(ss.UnavailableError, match=r"s3://nowhere/run/checkpoint: storage unreachable"):
        ss.latest_checkpoint("s3://nowhere/run", storage_options=options)
    v = ss.Variable("x", np.zeros(3), register=False)
    with pytest.raises(ss.UnavailableError, match="s3://nowhere/run"):
        ss.Saver([v], storage_options=options).save("s3://nowhere/run/model")
