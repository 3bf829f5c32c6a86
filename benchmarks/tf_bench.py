"""TensorFlow's own Saver on workload (a), single process, for comparison."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import raw_read, raw_write

    n_small, small, side = 1000, 4096, 4096
    n_big = max(1, int((args.gib * 2**30 - n_small * small * 4) // (side * side * 4)))
    arrays = [np.random.default_rng(i).standard_normal((side, side), dtype=np.float32) for i in range(n_big)]
    arrays += [np.full(small, i, np.float32) for i in range(n_small)]
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    variables = [tf.Variable(a, name=f"v{i}") for i, a in enumerate(arrays)]
    saver = tf.compat.v1.train.Saver(var_list={f"v{i}": v for i, v in enumerate(variables)}, max_to_keep=1)
    prefix = os.path.join(args.dir, "ckpt")
    outs = [np.empty_like(a) for a in arrays]
    runs = {"raw_write": [], "tf_save": [], "raw_read": [], "tf_restore": []}
    for i in range(args.repeat + 1):
        t = time.perf_counter()
        raw_write(os.path.join(args.dir, "raw"), arrays, fsync=False)
        rw = time.perf_counter() - t
        t = time.perf_counter()
        saver.save(None, prefix, write_meta_graph=False)
        sw = time.perf_counter() - t
        t = time.perf_counter()
        raw_read(os.path.join(args.dir, "raw"), outs)
        rr = time.perf_counter() - t
        t = time.perf_counter()
        saver.restore(None, prefix)
        sr = time.perf_counter() - t
        if i:
            for k, v in zip(runs, (rw, sw, rr, sr), strict=True):
                runs[k].append(v)
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["ss_save"], out["ss_restore"] = out.pop("tf_save"), out.pop("tf_restore")
    out["save_ratio"] = out["raw_write"] / out["ss_save"]
    out["restore_ratio"] = out["raw_read"] / out["ss_restore"]
    out["note"] = "TensorFlow's Saver (no fsync; TF does not fsync); ss_* columns hold TF's times"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
