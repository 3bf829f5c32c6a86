"""Shared test setup. tests/mpi runs only under mpiexec (tests/test_mpi.py launches it)."""

import os
import sys
import uuid

import pytest

collect_ignore = [] if os.environ.get("SHARDSAVE_MPI_TESTS") else ["mpi"]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHM = "/dev/shm"
_shm_before: set[str] = set()


def _mpich_segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM) if n.startswith("mpich_shm_")}
    except OSError:
        return set()


def pytest_sessionstart(session):
    _shm_before.update(_mpich_segments())


def pytest_sessionfinish(session, exitstatus):
    """MPICH leaves its shared-memory segment in /dev/shm when a job's ranks are killed
    (the fault tests kill ranks on purpose): remove the ones this session's jobs left, so
    runs do not fill the RAM disk. Not inside mpiexec (tests/mpi), where they are in use."""
    if os.environ.get("SHARDSAVE_MPI_TESTS"):
        return
    for name in _mpich_segments() - _shm_before:
        path = os.path.join(SHM, name)
        try:
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto's) on a free loopback port for the whole session, with a
    bucket; stopped at the end."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")
    from s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_dir(s3_server, request):
    """A fresh ``s3://bucket/<test>-<id>`` directory URL for one test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    return f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(directory, storage options, environment) on local disk or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "run"), None, dict(os.environ)
    server = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_dir"), server.options(), server.env()
