"""Many ranks under real mpiexec (issue "Speed at scale"), oversubscribed on this
machine's cores: a small model (3.8 MiB in 100 variables, 80 sharded by rows, 20
replicated) saved on 32 ranks, restored on the same 32 and on 12 (an uneven reshard:
each rank's 21 or 22 rows span three or four saved pieces of 8 rows), bit for bit.

The 64-rank run is in ``make bench`` (run.py's "ranks" row: benchmarks/ranks_bench.py
saves and restores on 8, 16, 32 and 64 ranks and on half as many, each rank checking its
rows bit for bit): under the whole suite it took 70 s, a tenth of the suite's budget.

The checkpoint is also checked in this process, against the values every rank computes
(tests/ranks/scale.py), so a save that wrote the same wrong bytes the restore reads back
is caught too.
"""

from __future__ import annotations

import os

import numpy as np
from faults.common import run_mpi
from ranks import scale

import shardsave as ss

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ranks", "scale.py")
SAVE_RANKS, RESTORE_RANKS = 32, 12


def launch(n: int, phase: str, directory: str) -> None:
    proc = run_mpi(n, [SCRIPT, "--dir", directory, "--phase", phase], timeout=240)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert proc.stdout.split()[:2] == ["ok", str(n)], log


def test_32_ranks_save_and_restore_bit_exact_on_32_and_on_12(tmp_path):
    directory = str(tmp_path)
    launch(SAVE_RANKS, "save", directory)
    prefix = os.path.join(directory, "model")
    files = sorted(n for n in os.listdir(directory) if n.startswith("model.data-"))
    assert files == sorted(f"model.data-{r:05d}-of-{SAVE_RANKS:05d}" for r in range(SAVE_RANKS))
    reader = ss.CheckpointReader(prefix)
    want = scale.global_values()
    assert sorted(reader.get_variable_to_shape_map()) == sorted(want)
    for name, value in want.items():
        got = reader.get_tensor(name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert np.array_equal(got.view(np.uint32), value.view(np.uint32)), name
    launch(RESTORE_RANKS, "restore", directory)
