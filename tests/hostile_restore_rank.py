"""One rank of a restore from a crafted index (test_hostile_index.py launches it under
mpiexec): rank 0 holds rows 0..384 of ``emb`` in place, rank 1 rows 384..512 and the rest.
Writes ``rank<r>.json`` into the directory ``argv[2]``: the error class and message, and
whether every array the rank holds is unchanged."""

from __future__ import annotations

import json
import sys

import numpy as np
from crafting import _emb_blocks, standard_layouts, variables
from mpi4py import MPI

import shardsave as ss

rank = MPI.COMM_WORLD.Get_rank()
spec = standard_layouts()["same"]
blocks = _emb_blocks([0, 384, 512], [0, 1024])
spec = {"emb": blocks[:1]} if rank == 0 else {**spec, "emb": blocks[1:]}
var_list = variables(spec)
before = {name: [v.value.copy() for v in vs] for name, vs in var_list.items()}
error = "none"
try:
    ss.Saver(var_list).restore(sys.argv[1])
except Exception as exc:  # noqa: BLE001 - reported to the test
    error = f"{type(exc).__name__}: {exc}"
same = all(
    np.array_equal(v.value, b) for name, vs in var_list.items() for v, b in zip(vs, before[name], strict=True)
)
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "error": error, "untouched": same}, f)
