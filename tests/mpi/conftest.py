"""Fixtures for tests that run on every rank of ``mpiexec -n N python -m mpi4py -m pytest``."""

import os

import pytest
from mpi4py import MPI


@pytest.fixture(scope="session")
def comm():
    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def root():
    """A directory shared by all ranks and all mpiexec runs of one test session."""
    path = os.environ["SHARDSAVE_MPI_ROOT"]
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture
def phase():
    return os.environ.get("SHARDSAVE_MPI_PHASE", "save")
