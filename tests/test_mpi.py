"""Runs tests/mpi under real ``mpiexec`` with 1, 2, 3 and 4 ranks, and checks the
checkpoints they write with TensorFlow.

Each launch is ``mpiexec -n N python -m mpi4py -m pytest tests/mpi``: with ``-m mpi4py``
an uncaught error on one rank aborts the whole job instead of leaving the others waiting,
and the timeout below ends any run that hangs anyway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
TIMEOUT = 300


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mpi"))


def run_ranks(n: int, phase: str, root: str) -> None:
    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra (the mpich wheel)")
    env = dict(os.environ, SHARDSAVE_MPI_TESTS="1", SHARDSAVE_MPI_ROOT=root, SHARDSAVE_MPI_PHASE=phase)
    cmd = [
        MPIEXEC,
        "-n",
        str(n),
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        os.path.join(HERE, "mpi"),
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{n} ranks, phase {phase}: hung for {TIMEOUT}s\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, (
        f"{n} ranks, phase {phase} failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    )
    assert " passed" in proc.stdout


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_save_on_ranks(n, root):
    run_ranks(n, "save", root)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_restore_on_ranks(m, root):
    if not os.path.exists(os.path.join(root, "n4", "model-1.index")):
        pytest.fail("the save phase did not leave checkpoints")
    run_ranks(m, "restore", root)


def test_tensorflow_reads_a_three_rank_checkpoint(root):
    tf = pytest.importorskip("tensorflow")
    sys.path.insert(0, os.path.join(HERE, "mpi"))
    from layouts import SAVED, global_value

    prefix = os.path.join(root, "n3", "model-1")
    names = dict(tf.train.list_variables(prefix))
    for name, (shape, dtype, _) in SAVED.items():
        assert names[name] == list(shape)
        got = tf.train.load_variable(prefix, name)
        want = global_value(name, shape, dtype)
        assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8)), name


def test_tensorflow_restores_sharded_checkpoint_into_partitioned_variable(root):
    tf = pytest.importorskip("tensorflow")
    sys.path.insert(0, os.path.join(HERE, "mpi"))
    from layouts import SAVED, global_value

    shape, dtype, _ = SAVED["rows"]
    with tf.Graph().as_default():
        var = tf.compat.v1.get_variable(
            "rows", shape=shape, dtype=tf.float32, partitioner=tf.compat.v1.fixed_size_partitioner(3)
        )
        saver = tf.compat.v1.train.Saver({"rows": var})
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, os.path.join(root, "n4", "model-1"))
            got = sess.run(tf.convert_to_tensor(var))
    assert np.array_equal(got, global_value("rows", shape, dtype))
