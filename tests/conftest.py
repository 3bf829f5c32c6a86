"""Shared test setup. tests/mpi runs only under mpiexec (tests/test_mpi.py launches it)."""

import os
import sys
import uuid

import pytest

collect_ignore = [] if os.environ.get("SHARDSAVE_MPI_TESTS") else ["mpi"]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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
