"""PyTorch Distributed Checkpoint (DCP) on workloads (a) and (b), single process.

Runs in the peers' environment (.venv-peers, `make bench-peers`), not the test one.
DCP's FileSystemWriter fsyncs its files (sync_files=True), so raw here fsyncs too.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import arguments, timed_raw, workload_arrays  # noqa: E402


def main() -> int:
    args = arguments().parse_args()
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed.checkpoint as dcp

    arrays = workload_arrays(args.workload, args.gib)
    state = {f"v{i}": torch.from_numpy(a) for i, a in enumerate(arrays)}
    target = {k: torch.empty_like(v) for k, v in state.items()}
    outs = [np.empty_like(a) for a in arrays]
    runs = {"raw_write": [], "dcp_save": [], "raw_read": [], "dcp_restore": []}
    for i in range(args.repeat + 1):
        rw, rr = timed_raw(args.dir, arrays, outs)
        os.sync()
        t = time.perf_counter()
        dcp.save(state, checkpoint_id=os.path.join(args.dir, "dcp"))
        sw = time.perf_counter() - t
        t = time.perf_counter()
        dcp.load(target, checkpoint_id=os.path.join(args.dir, "dcp"))
        sr = time.perf_counter() - t
        if i:
            for k, v in zip(runs, (rw, sw, rr, sr), strict=True):
                runs[k].append(v)
    assert all(torch.equal(target[k], state[k]) for k in state)
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["ss_save"], out["ss_restore"] = out.pop("dcp_save"), out.pop("dcp_restore")
    out["save_ratio"] = out["raw_write"] / out["ss_save"]
    out["restore_ratio"] = out["raw_read"] / out["ss_restore"]
    out["note"] = f"PyTorch {torch.__version__} DCP, 1 process, loads in place into preallocated tensors"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
