"""Every error is shardsave's.

- Storage failures met for real (a full disk, a read-only filesystem, no permission) are
  :class:`StorageError` subclasses that keep the errno, and one rank's failure raises the
  same class with the same errno on every rank. Damage read back stays DataLossError.
- The ``shardsave`` command answers a user's mistake (a file instead of a prefix, a
  missing directory, a read-only directory, wrong or missing S3 credentials, a misspelled
  bucket, a bad state file) with one line on stderr and exit status 1, never a traceback.
- Without a loadable MPI library one process works as one rank; a launch of several
  ranks says which variable told it so and how to fix it.

The real failures come from a tmpfs mounted in a private mount namespace (``unshare
--mount``; where that is not allowed, in a user namespace too) and from dropping root.
Those scenarios run in subprocesses, as this file run as a script:
``python tests/test_errors.py SCENARIO DIR REPORTS`` leaves one JSON report per process
in REPORTS.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from cli_helpers import shardsave_main
from faults.common import run_group

import shardsave as ss
from shardsave import errors, storage

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
SHARDSAVE = shutil.which("shardsave", path=BIN) or shutil.which("shardsave")
MPIEXEC = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
NOBODY = 65534
NO_MPI = {"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}  # mpi4py 4 loads its MPI library from here


@pytest.fixture(autouse=True)
def fresh_graph():
    ss.reset_default_graph()


# ------------------------------------------------------------------ running things


def shardsave_cmd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed ``shardsave`` console script, as a user runs it."""
    assert SHARDSAVE is not None, "the shardsave console script is not installed (pip install -e .)"
    return run_group([SHARDSAVE, *args], env=env, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess | tuple, *needles: str) -> str:
    """Exit status 1, no traceback, exactly one line on stderr, containing ``needles``."""
    code, out, err = proc if isinstance(proc, tuple) else (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def reports(tmp_path_factory) -> str:
    """Where scenario processes leave their reports (not on the tmpfs they test, which
    goes away with them; open to everyone, for the process that drops root)."""
    path = str(tmp_path_factory.mktemp("reports"))
    os.chmod(path, 0o777)
    return path


def results(proc: subprocess.CompletedProcess, reports: str) -> list[dict]:
    """The reports of a scenario's processes (a file each: ranks' stdout can interleave)."""
    found = []
    for name in sorted(os.listdir(reports)):
        with open(os.path.join(reports, name)) as f:
            found.append(json.load(f))
    assert proc.returncode == 0 and found, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return found


def scenario(name: str, directory: str, reports: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), name, directory, reports]


@functools.cache
def namespace_prefix() -> tuple[str, ...] | None:
    """How to get a private mount namespace where a tmpfs can be mounted: ``unshare
    --mount`` as root, else a user namespace too; None if neither is allowed here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = tempfile.mkdtemp()
    try:
        for flags in (("--mount",), ("--user", "--map-root-user", "--mount")):
            cmd = [unshare, *flags, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe]
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
                return (unshare, *flags)
    finally:
        os.rmdir(probe)
    return None


def on_tmpfs(directory: str, size: str, cmd: list[str]) -> list[str]:
    """``cmd`` run with a fresh tmpfs of ``size`` on ``directory``, seen by it alone (the
    mount goes away with the namespace)."""
    prefix = namespace_prefix()
    if prefix is None:
        message = "cannot mount a tmpfs here: neither `unshare --mount` nor user namespaces are allowed"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI the real failures must be tested, not skipped
        pytest.skip(message)
    mount = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'
    return [*prefix, "sh", "-c", mount, "sh", size, directory, *cmd]


# ------------------------------------------------------------------ the error classes
def test_storage_error_classes_keep_errno_and_their_builtin_bases():
    err = ss.PermissionDeniedError(
        "writing /d/x: Permission denied (EACCES)", errno.EACCES, "Permission denied", "/d/x"
    )
    assert isinstance(err, ss.StorageError) and isinstance(err, ss.ShardsaveError)
    assert isinstance(err, PermissionError) and isinstance(err, OSError)
    assert (err.errno, err.strerror, err.filename) == (errno.EACCES, "Permission denied", "/d/x")
    assert str(err) == "writing /d/x: Permission denied (EACCES)"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ss.PermissionDeniedError and (back.errno, back.filename, str(back)) == (
        13,
        "/d/x",
        str(err),
    )
    assert issubclass(ss.UnauthenticatedError, ss.PermissionDeniedError)
    assert issubclass(ss.ResourceExhaustedError, ss.StorageError)
    assert not issubclass(ss.ResourceExhaustedError, PermissionError)
    assert ss.StorageError("no errno").errno is None
    assert sorted(ss.__all__) == ss.__all__ and sorted(errors.__all__) == errors.__all__
    for name in ("StorageError", "ResourceExhaustedError", "UnauthenticatedError", "PermissionDeniedError"):
        assert name in ss.__all__ and name in errors.__all__ and getattr(ss, name) is getattr(errors, name)


def test_errors_of_several_ranks_combine_into_one_class_with_their_errno():
    from shardsave._reports import combined_error
    from shardsave._reports import describe as _describe

    def report(exc):
        return _describe(exc)

    full = [
        (r, report(ss.ResourceExhaustedError(f"writing f{r}: full", errno.ENOSPC, "x", f"f{r}")))
        for r in (1, 3)
    ]
    err = combined_error(full, "saving P")
    assert type(err) is ss.ResourceExhaustedError and err.errno == errno.ENOSPC and err.filename is None
    assert "rank(s) 1, 3" in str(err) and "writing f3: full" in str(err)
    one = combined_error(full[:1], "saving P")
    assert (type(one), one.errno, one.filename, one.strerror) == (
        ss.ResourceExhaustedError,
        errno.ENOSPC,
        "f1",
        os.strerror(errno.ENOSPC),
    )
    mixed = combined_error([full[0], (2, report(ss.PermissionDeniedError("w: ro", errno.EROFS)))], "saving P")
    assert type(mixed) is ss.StorageError and mixed.errno is None  # the closest common class
    other = combined_error([full[0], (2, report(ss.InvalidArgumentError("bad")))], "saving P")
    assert type(other) is ss.AbortedError


# ------------------------------------------------------------------ real storage failures
def test_a_full_disk_is_resource_exhausted_with_its_errno_and_keeps_the_old_checkpoint(tmp_path, reports):
    (out,) = results(
        run_group(on_tmpfs(str(tmp_path), "256k", scenario("enospc", str(tmp_path), reports))), reports
    )
    err = out["error"]
    assert err["cls"] == "ResourceExhaustedError" and err["errno"] == errno.ENOSPC and err["oserror"]
    data = f"{tmp_path}/m-2.data-00000-of-00001"
    # the data file is written under a staged name of this save's own until the commit
    assert err["filename"].startswith(data) and err["filename"] in err["message"]
    assert "No space left on device" in err["message"]
    assert out["latest"] == f"{tmp_path}/m-1" and not out["index_2"] and out["restored"]


def test_a_full_disk_on_one_of_two_ranks_is_the_same_class_and_errno_on_both(tmp_path, reports):
    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra (the mpich wheel)")
    cmd = [
        MPIEXEC,
        "-n",
        "2",
        sys.executable,
        "-m",
        "mpi4py",
        *scenario("enospc_ranks", str(tmp_path), reports)[1:],
    ]
    outs = results(run_group(on_tmpfs(str(tmp_path), "256k", cmd)), reports)
    assert sorted(o["rank"] for o in outs) == [0, 1]
    for out in outs:
        err = out["error"]
        assert err["cls"] == "ResourceExhaustedError" and err["errno"] == errno.ENOSPC, out
        # rank 1 holds 1 MiB and always fails; rank 0's 8 KiB may or may not still fit
        assert f"{tmp_path}/m-1.data-00001-of-00002" in err["message"] and "No space left" in err["message"]
        if err["message"].count("rank 0:") == 0:
            # the staged name of this save's own data file, until the commit renames it
            assert err["filename"].startswith(f"{tmp_path}/m-1.data-00001-of-00002.")
    assert outs[0]["error"] == outs[1]["error"]


def test_a_read_only_filesystem_denies_saving_and_gc_but_restores_and_lists(tmp_path, reports):
    (out,) = results(
        run_group(on_tmpfs(str(tmp_path), "1m", scenario("erofs", str(tmp_path), reports))), reports
    )
    err = out["error"]
    assert err["cls"] == "PermissionDeniedError" and err["errno"] == errno.EROFS and err["permission"]
    assert "m-2" in err["message"] and "Read-only file system" in err["message"]
    assert out["restored"]
    assert_one_line_error(
        tuple(out["gc"]),
        "shardsave gc: error:",
        f"{tmp_path}/old-3.data-00000-of-00001",
        "Read-only file system",
    )
    assert out["ls"][0] == 0 and "m-1" in out["ls"][1] and "(latest)" in out["ls"][1]
    assert out["gc_dry_run"][0] == 0 and "old-3.data-00000-of-00001" in out["gc_dry_run"][1]


def test_no_permission_is_permission_denied_with_eacces():
    """As root, permissions are not checked: the scenario drops to nobody after saving."""
    base = tempfile.mkdtemp()  # in /tmp, which nobody may enter (tmp_path's parents are 0700)
    try:
        reports = os.path.join(base, "reports")
        os.mkdir(reports)
        os.chmod(reports, 0o777)
        os.chmod(base, 0o755)
        (out,) = results(run_group(scenario("eacces", base, reports)), reports)
    finally:
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(base, "ckpt"), 0o755)
        shutil.rmtree(base)
    err = out["error"]
    assert err["cls"] == "PermissionDeniedError" and err["errno"] == errno.EACCES and err["permission"]
    assert f"{base}/ckpt/m-2" in err["message"] and "Permission denied" in err["message"]
    assert out["restored"]
    assert_one_line_error(tuple(out["gc"]), f"{base}/ckpt/old-3.data-00000-of-00001", "Permission denied")


def test_an_io_error_on_write_is_a_storage_error_and_on_reading_the_index_is_data_loss(tmp_path, monkeypatch):
    """EIO cannot be had for real here (no faulty device): injected at the system call."""
    saver = ss.Saver([ss.Variable("v", np.arange(1000.0), register=False)])
    first = saver.save(str(tmp_path / "m"), global_step=1)

    def eio(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(storage.local.os, "fsync", eio)
    with pytest.raises(ss.StorageError) as info:
        saver.save(str(tmp_path / "m"), global_step=2)
    assert type(info.value) is ss.StorageError and info.value.errno == errno.EIO
    assert "m-2" in str(info.value) and "Input/output error" in str(info.value)
    monkeypatch.undo()

    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith(".index"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(storage.local, "open", failing_open, raising=False)
    with pytest.raises(ss.DataLossError, match=rf"{first}\.index: reading failed: Input/output error"):
        ss.CheckpointReader(first)


# ------------------------------------------------------------------ the command line, locally
@pytest.fixture
def checkpoint_dir(tmp_path):
    ss.Saver([ss.Variable("w", np.arange(6.0), register=False)]).save(
        str(tmp_path / "d" / "m"), global_step=1
    )
    return tmp_path / "d"


def test_cli_a_file_instead_of_a_prefix(checkpoint_dir):
    """inspect and ls take a file of a checkpoint for its prefix (issue 13; tests/test_cli.py
    has the rest); gc wants a directory."""
    index, data = f"{checkpoint_dir}/m-1.index", f"{checkpoint_dir}/m-1.data-00000-of-00001"
    for proc in (shardsave_cmd("inspect", index), shardsave_main("inspect", data)):
        code, out, err = proc if isinstance(proc, tuple) else (proc.returncode, proc.stdout, proc.stderr)
        assert code == 0 and err == "" and out.startswith(f"checkpoint: {checkpoint_dir}/m-1 "), err
    assert_one_line_error(shardsave_main("gc", index), f"shardsave gc: error: {index}: not a directory")


def test_cli_a_missing_directory(tmp_path):
    missing = str(tmp_path / "no" / "such")
    assert_one_line_error(shardsave_main("inspect", missing), f"no checkpoint found at '{missing}'")
    for proc, command in ((shardsave_cmd("gc", missing), "gc"), (shardsave_main("ls", missing), "ls")):
        assert_one_line_error(proc, f"shardsave {command}: error: {missing}: no such directory")
    assert not os.path.exists(missing)


def test_cli_an_invalid_state_file(checkpoint_dir):
    (checkpoint_dir / "checkpoint").write_text("this is not a state file\n")
    for proc in (shardsave_cmd("inspect", str(checkpoint_dir)), shardsave_main("ls", str(checkpoint_dir))):
        assert_one_line_error(proc, f"{checkpoint_dir}/checkpoint", "not a valid checkpoint state file")


def test_cli_usage_errors_exit_2_and_bad_options_exit_1(checkpoint_dir):
    code, _, err = shardsave_main("inspect")
    assert code == 2 and "Traceback" not in err and "required: path" in err
    assert_one_line_error(
        shardsave_main("ls", str(checkpoint_dir), "--storage-options", "{"), "not valid JSON"
    )


# ------------------------------------------------------------------ S3: the cause is kept
def test_a_misspelled_bucket_says_the_bucket_does_not_exist(s3_server):
    url = "s3://no-such-bucket-shardsave-errors/run"
    opts = s3_server.options()
    with pytest.raises(ss.NotFoundError, match="bucket 'no-such-bucket-shardsave-errors' does not exist"):
        ss.Saver([ss.Variable("w", np.zeros(2), register=False)], storage_options=opts).restore(f"{url}/m-1")
    assert_one_line_error(
        shardsave_cmd("inspect", f"{url}/m-1", env=s3_server.env()),
        "shardsave inspect: error:",
        "bucket 'no-such-bucket-shardsave-errors' does not exist",
    )
    for command in ("ls", "gc"):
        assert_one_line_error(
            shardsave_main(command, url, "--storage-options", json.dumps(opts)),
            f"{url}: bucket",
            "does not exist",
        )


def test_missing_s3_credentials_are_one_line(s3_server, s3_dir, monkeypatch):
    ss.Saver([ss.Variable("w", np.zeros(2), register=False)], storage_options=s3_server.options()).save(
        f"{s3_dir}/m", global_step=1
    )
    env = s3_server.env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance role to wait for
    needles = (s3_dir, "no S3 credentials found", "AWS_ACCESS_KEY_ID")
    assert_one_line_error(shardsave_cmd("inspect", f"{s3_dir}/m-1", env=env), *needles)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = json.dumps({"endpoint_url": s3_server.endpoint, "skip_instance_cache": True})  # a fresh client
    for command in ("ls", "gc"):
        assert_one_line_error(shardsave_main("--storage-options", options, command, s3_dir), *needles)


DENIALS = {
    "unknown key": (
        "UnauthenticatedError",
        "the access key ID is not known to the store (S3 InvalidAccessKeyId)",
    ),
    "wrong secret": (
        "UnauthenticatedError",
        "the secret key does not match the access key ID (S3 SignatureDoesNotMatch)",
    ),
    "no permission": (
        "PermissionDeniedError",
        "not allowed to do this (bucket or IAM policy) (S3 AccessDenied)",
    ),
}


def test_wrong_secret_unknown_key_and_missing_permission_are_told_apart(s3_server, s3_dir):
    opts = s3_server.options()
    ss.Saver([ss.Variable("w", np.zeros(2), register=False)], storage_options=opts).save(
        f"{s3_dir}/m", global_step=1
    )
    iam = s3_server.client("iam")
    user = f"nobody-{os.urandom(4).hex()}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    credentials = {
        "unknown key": ("AKIAUNKNOWNUNKNOWN00", "whatever"),
        "wrong secret": (key["AccessKeyId"], "not-the-secret"),
        "no permission": (key["AccessKeyId"], key["SecretAccessKey"]),
    }
    s3_server.set_auth(True)
    try:
        for case, (cls, reason) in DENIALS.items():
            access_key, secret = credentials[case]
            denied = dict(opts, key=access_key, secret=secret)
            for call in (
                lambda o=denied: ss.latest_checkpoint(s3_dir, storage_options=o),
                lambda o=denied: ss.CheckpointReader(f"{s3_dir}/m-1", storage_options=o),
            ):
                with pytest.raises(ss.PermissionDeniedError) as info:
                    call()
                assert type(info.value).__name__ == cls and info.value.errno == errno.EACCES, case
                assert s3_dir in str(info.value) and reason in str(info.value), case
            if case == "wrong secret":  # once as a user runs it, credentials from the environment
                env = dict(s3_server.env(), AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret)
                assert_one_line_error(
                    shardsave_cmd("inspect", f"{s3_dir}/m-1", env=env), f"{s3_dir}/m-1", reason
                )
            options = ("--storage-options", json.dumps(denied))
            for command, path in (("inspect", f"{s3_dir}/m-1"), ("ls", s3_dir), ("gc", s3_dir)):
                assert_one_line_error(shardsave_main(*options, command, path), path, reason)
    finally:
        s3_server.set_auth(False)


# ------------------------------------------------------------------ without MPI
def test_without_an_mpi_library_one_process_saves_restores_and_runs_the_cli(tmp_path, reports):
    env = dict(os.environ, **NO_MPI)
    (out,) = results(run_group(scenario("no_mpi", str(tmp_path), reports), env=env), reports)
    assert out["mpi4py"].startswith("cannot load MPI library")  # the situation is real
    assert out["size"] == 1 and out["restored"] and out["batch_script"] == 1
    for name in ("OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "MV2_COMM_WORLD_SIZE"):
        err = out[name]
        assert err["cls"] == "FailedPreconditionError", err
        assert f"{name}=" in err["message"] and "shardsave[mpi]" in err["message"]
    ls = shardsave_cmd("ls", str(tmp_path), env=env)
    assert ls.returncode == 0 and "m-1" in ls.stdout and "Traceback" not in ls.stderr
    assert out["inspect"][0] == 0 and "w  float64  [6]" in out["inspect"][1]


def test_a_multi_rank_launch_without_an_mpi_library_is_a_clear_error(tmp_path, reports):
    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra (the mpich wheel)")
    env = dict(os.environ, **NO_MPI)
    outs = results(
        run_group([MPIEXEC, "-n", "2", *scenario("no_mpi_ranks", str(tmp_path), reports)], env=env), reports
    )
    assert len(outs) == 2
    for out in outs:
        err = out["error"]
        assert err["cls"] == "FailedPreconditionError"
        assert "PMI_SIZE=2 says this process is one of 2 ranks" in err["message"]
        assert (
            "cannot load MPI library" in err["message"] and "pip install 'shardsave[mpi]'" in err["message"]
        )
    assert not os.listdir(tmp_path)  # nothing written


# ------------------------------------------------------------------ the scenarios (subprocesses)
def _raised(call) -> dict | None:
    """What ``call`` raised, as plain data (None if it returned)."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported, the test asserts on it
        return {
            "cls": type(exc).__name__,
            "errno": getattr(exc, "errno", None),
            "filename": getattr(exc, "filename", None),
            "message": str(exc),
            "oserror": isinstance(exc, OSError),
            "permission": isinstance(exc, PermissionError),
        }
    return None


def _save_small(d: str) -> tuple[str, ss.Variable]:
    v = ss.Variable("w", np.arange(6.0), register=False)
    first = ss.Saver([v]).save(f"{d}/m", global_step=1)
    shutil.copy(f"{first}.data-00000-of-00001", f"{d}/old-3.data-00000-of-00001")  # a failed save's leftover
    return first, v


def _restores(prefix: str) -> bool:
    v = ss.Variable("w", np.zeros(6), register=False)
    ss.Saver([v]).restore(prefix)
    return v.value.tolist() == list(np.arange(6.0))


def _scenario_enospc(d: str) -> dict:
    first = ss.Saver([ss.Variable("w", np.arange(6.0), register=False)]).save(f"{d}/m", global_step=1)
    big = ss.Variable("w", np.ones(1 << 17), register=False)  # 1 MiB on a 256 KiB tmpfs
    error = _raised(lambda: ss.Saver([big]).save(f"{d}/m", global_step=2))
    return {
        "error": error,
        "latest": ss.latest_checkpoint(d),
        "index_2": os.path.exists(f"{d}/m-2.index"),
        "restored": _restores(first),
    }


def _scenario_enospc_ranks(d: str) -> dict:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows, start = (1, 0) if comm.rank == 0 else (128, 1)  # rank 1 writes 1 MiB on a 256 KiB tmpfs
    v = ss.Variable("w", np.ones((rows, 1024)), global_shape=(129, 1024), offset=(start, 0), register=False)
    return {
        "rank": comm.rank,
        "error": _raised(lambda: ss.Saver([v], comm=comm).save(f"{d}/m", global_step=1)),
    }


def _scenario_erofs(d: str) -> dict:
    first, v = _save_small(d)
    subprocess.run(["mount", "-o", "remount,ro", d], check=True)
    return {
        "error": _raised(lambda: ss.Saver([v]).save(f"{d}/m", global_step=2)),
        "restored": _restores(first),
        "gc": shardsave_main("gc", d),
        "ls": shardsave_main("ls", d),
        "gc_dry_run": shardsave_main("gc", "--dry-run", d),
    }


def _scenario_eacces(base: str) -> dict:
    d = os.path.join(base, "ckpt")
    first, v = _save_small(d)
    _restores(first)
    shardsave_main("ls", d)  # every module imported while root may still read them
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    else:
        os.chmod(d, 0o555)
    return {
        "error": _raised(lambda: ss.Saver([v]).save(f"{d}/m", global_step=2)),
        "restored": _restores(first),
        "gc": shardsave_main("gc", d),
    }


def _scenario_no_mpi(d: str) -> dict:
    from shardsave._comm import LAUNCHER_SIZES

    out: dict = {}
    try:
        from mpi4py import MPI  # noqa: F401
    except RuntimeError as exc:
        out["mpi4py"] = str(exc)
    for name in LAUNCHER_SIZES:
        os.environ.pop(name, None)
    v = ss.Variable("w", np.arange(6.0))
    saver = ss.Saver()
    prefix = saver.save(f"{d}/m", global_step=1)
    out.update(size=saver.comm.size, restored=_restores(prefix), inspect=shardsave_main("inspect", d))
    os.environ.update(SLURM_NTASKS="4", SLURM_PROCID="0")  # a batch script: one process of a 4-task job
    out["batch_script"] = ss.Saver([v]).comm.size
    for name, size in (
        ("OMPI_COMM_WORLD_SIZE", "3"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("MV2_COMM_WORLD_SIZE", "2"),
    ):
        os.environ[name] = size
        out[name] = _raised(lambda: ss.Saver([v]))
        del os.environ[name]
    return out


def _scenario_no_mpi_ranks(d: str) -> dict:
    v = ss.Variable("w", np.arange(6.0))
    return {"error": _raised(lambda: ss.Saver([v]).save(f"{d}/m", global_step=1))}


if __name__ == "__main__":
    _name, _directory, _reports = sys.argv[1:4]
    _report = json.dumps(globals()[f"_scenario_{_name}"](_directory))
    with open(os.path.join(_reports, f"{os.getpid()}.json"), "w") as _f:
        _f.write(_report)
