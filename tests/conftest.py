"""Shared test setup. tests/mpi runs only under mpiexec (tests/test_mpi.py launches it)."""

import os

collect_ignore = [] if os.environ.get("SHARDSAVE_MPI_TESTS") else ["mpi"]
