"""The model the fault scripts save, and how tests launch programs under mpiexec.

Every value is a pure function of (name, step), so the test process can check a restored
checkpoint bit for bit without talking to the ranks that wrote it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")

COLS = 256
STRINGS = [b"alpha", b"", b"\x00\xff binary"]


def global_values(step: int, rows: int) -> dict[str, np.ndarray]:
    """The whole value of every variable at ``step``."""
    rng = np.random.default_rng([7, step])
    return {
        "embedding": rng.standard_normal((rows, COLS)).astype(np.float32),
        "dense/kernel": rng.standard_normal((COLS, 8)).astype(np.float64),
        "global_step": np.int64(step),
        "names": np.array(STRINGS + [b"step %d" % step], dtype=object),
    }


def row_range(rows: int, rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def make_vars(rows: int, rank: int = 0, size: int = 1) -> dict:
    """This rank's variables (uninitialized): embedding row-sharded, the rest replicated."""
    import shardsave as ss

    ss.reset_default_graph()
    lo, hi = row_range(rows, rank, size)
    return {
        "embedding": ss.Variable(
            "embedding", dtype=np.float32, shape=(hi - lo, COLS), global_shape=(rows, COLS), offset=(lo, 0)
        ),
        "dense/kernel": ss.Variable("dense/kernel", dtype=np.float64, shape=(COLS, 8)),
        "global_step": ss.Variable("global_step", dtype=np.int64, shape=()),
        "names": ss.Variable("names", dtype=object, shape=(len(STRINGS) + 1,)),
    }


def assign(variables: dict, step: int, rows: int, rank: int = 0, size: int = 1) -> None:
    lo, hi = row_range(rows, rank, size)
    for name, value in global_values(step, rows).items():
        variables[name].assign(value[lo:hi] if name == "embedding" else value)


def check_equal(variables: dict, step: int, rows: int) -> None:
    """Assert that single-process ``variables`` hold exactly the values of ``step``."""
    for name, want in global_values(step, rows).items():
        got = variables[name].value
        if want.dtype == object:
            assert list(got) == list(want), name
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), f"{name} differs from step {step}"


def run_mpi(
    n: int, args: list[str], env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``mpiexec -n N python -m mpi4py ARGS``; the whole process group dies on timeout."""
    import pytest

    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra (the mpich wheel)")
    return run_group([MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *args], env, timeout)


def run_nodes(
    nodes: list[tuple[str, int]], args: list[str], env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """One job whose ranks sit on simulated nodes: ``nodes`` = [(node id, ranks), ...] in
    rank order, launched with MPICH's MPMD syntax, each part with its own
    ``SHARDSAVE_NODE_ID`` (``mpiexec -n 2 -env SHARDSAVE_NODE_ID a python -m mpi4py ARGS :
    -n 2 -env SHARDSAVE_NODE_ID b ...``)."""
    import pytest

    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra (the mpich wheel)")
    cmd = [MPIEXEC]
    for i, (node, n) in enumerate(nodes):
        if i:
            cmd.append(":")
        cmd += ["-n", str(n), "-env", "SHARDSAVE_NODE_ID", node, sys.executable, "-m", "mpi4py", *args]
    return run_group(cmd, env, timeout)


def run_group(cmd: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group from the repository; the whole group dies,
    and the test fails, if it hangs."""
    import pytest

    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout}s\n{out[-4000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
