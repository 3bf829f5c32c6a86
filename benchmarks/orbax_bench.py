"""Orbax (orbax-checkpoint on jax's CPU backend) on workloads (a) and (b), single process.

Runs in the peers' environment (.venv-peers, `make bench-peers`), not the test one.

API: ``orbax.checkpoint.StandardCheckpointer`` with its defaults (OCDBT on, zarr v2,
zstd level 1 compression), which is what Orbax's docs use for a pytree of arrays. The
pytree is a dict of the same numpy arrays dcp_bench.py uses (``--arrays jax`` puts them on
the CPU device first). The save is asynchronous: the timed save is ``save()`` plus
``wait_until_finished()``, i.e. until the checkpoint is committed; the blocking
``save()`` call alone is reported as ``orbax_save_call``. Restore gets an abstract target
tree of ``jax.ShapeDtypeStruct`` (without a sharding: Orbax returns new numpy arrays; with
``--arrays jax``, with the CPU device's sharding: new jax arrays). Orbax cannot restore
into preallocated buffers, so ``raw_read_fresh`` (raw into freshly allocated buffers) is
measured too, next to raw into preallocated buffers as in dcp_bench.py.

Orbax fsyncs: its array data and OCDBT manifests are written by TensorStore's ``file``
kvstore, whose ``file_io_sync`` context resource defaults to true (fsync of each data file,
manifest and directory before the write counts as committed; Orbax does not override it;
checked with strace: 60 fsyncs for a 201-array checkpoint). So raw here fsyncs too. Orbax's
small JSON metadata files and its final rename of the temporary directory are not fsynced.

Orbax refuses to overwrite a checkpoint, so every save goes to a fresh directory; the
directory of each round is deleted at the start of the next.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import arguments, raw_read, timed_raw, workload_arrays  # noqa: E402


def main() -> int:
    p = arguments()
    p.add_argument(
        "--arrays",
        choices=["numpy", "jax"],
        default="numpy",
        help="save numpy arrays and restore numpy arrays (default), or jax arrays on the CPU device",
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)

    arrays = workload_arrays(args.workload, args.gib)
    if args.arrays == "jax":
        device = jax.devices("cpu")[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        state = {f"v{i}": jax.device_put(a, device) for i, a in enumerate(arrays)}
        jax.block_until_ready(state)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in state.items()}
    else:
        state = {f"v{i}": a for i, a in enumerate(arrays)}
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in state.items()}
    outs = [np.empty_like(a) for a in arrays]
    runs = {
        "raw_write": [],
        "orbax_save": [],
        "raw_read": [],
        "orbax_restore": [],
        "raw_read_fresh": [],
        "orbax_save_call": [],
    }
    restored = None
    with ocp.StandardCheckpointer() as ckptr:
        for i in range(args.repeat + 1):
            rw, rr = timed_raw(args.dir, arrays, outs)
            t = time.perf_counter()
            raw_read(os.path.join(args.dir, "raw"), [np.empty_like(a) for a in arrays])
            rf = time.perf_counter() - t
            ckpt = os.path.join(args.dir, f"orbax-{i}")  # a fresh directory: Orbax does not overwrite
            restored = None
            os.sync()
            t = time.perf_counter()
            ckptr.save(ckpt, state)
            sc = time.perf_counter() - t
            ckptr.wait_until_finished()
            sw = time.perf_counter() - t
            t = time.perf_counter()
            restored = ckptr.restore(ckpt, target)
            jax.block_until_ready(restored)
            sr = time.perf_counter() - t
            if i:
                for k, v in zip(runs, (rw, sw, rr, sr, rf, sc), strict=True):
                    runs[k].append(v)
    shutil.rmtree(args.dir, ignore_errors=True)
    kind = np.ndarray if args.arrays == "numpy" else jax.Array
    assert all(isinstance(restored[k], kind) for k in state)
    assert all(np.array_equal(np.asarray(restored[k]), a) for k, a in zip(state, arrays, strict=True))
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["ss_save"], out["ss_restore"] = out.pop("orbax_save"), out.pop("orbax_restore")
    out["save_ratio"] = out["raw_write"] / out["ss_save"]
    out["restore_ratio"] = out["raw_read"] / out["ss_restore"]
    out["restore_ratio_fresh"] = out["raw_read_fresh"] / out["ss_restore"]
    out.update(
        repeat=args.repeat,
        fsync=True,
        arrays=args.arrays,
        bytes=sum(a.nbytes for a in arrays),
        variables=len(arrays),
        orbax=importlib.metadata.version("orbax-checkpoint"),
        jax=jax.__version__,
    )
    out["note"] = (
        f"Orbax {out['orbax']} StandardCheckpointer (fsyncs; OCDBT, zstd), jax {jax.__version__} CPU, "
        f"1 process, restores new {args.arrays} arrays from an abstract tree"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
