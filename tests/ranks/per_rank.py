"""Run under mpiexec: per-rank state (tests/test_state.py).

``--phase save`` (on 2 ranks) saves a tree with a replicated array and per-rank leaves (a
numpy RNG-like state, an iterator position, a Generator's state as bytes, one leaf with
``on_resize="all_rows"``). ``--phase restore`` on the same 2 ranks checks that every rank
gets its own rows back in place; on 3 ranks, that the tree raises FailedPreconditionError
on every rank and changes nothing, and that a tree asking for all rows gets them. Rank 0
prints one JSON line per rank: ``rank R: {...}``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from mpi4py import MPI

import shardsave as ss

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def generator_state(seed: int) -> np.ndarray:
    """A numpy Generator's state as a uint8 array (its dict holds 128-bit integers)."""
    state = json.dumps(np.random.default_rng(seed).bit_generator.state).encode()
    return np.frombuffer(state.ljust(256), np.uint8).copy()


def tree(fill: bool) -> dict:
    return {
        "model": {"w": np.arange(6.0) if fill else np.zeros(6)},
        "rng": ss.PerRank(np.full(3, RANK if fill else -1, np.int64)),
        "data": {"position": ss.PerRank(100 + RANK if fill else -1)},
        "generator": ss.PerRank(generator_state(RANK) if fill else np.zeros(256, np.uint8)),
    }


def report(out: dict) -> None:
    lines = COMM.gather(f"rank {RANK}: {json.dumps(out)}")
    if RANK == 0:
        print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["save", "restore"])
    parser.add_argument("--dir")
    args = parser.parse_args()
    prefix = os.path.join(args.dir, "ckpt")
    out: dict = {}
    if args.phase == "save":
        state = tree(fill=True)
        state["spread"] = ss.PerRank(np.full(2, 10.0 * RANK), on_resize="all_rows")
        out["prefix"] = ss.Saver(state).save(prefix)
        report(out)
        return
    state = tree(fill=False)
    rng, generator = state["rng"].value, state["generator"].value
    saver = ss.Saver(state)
    try:
        got = saver.restore(prefix)
        out["restored"] = {
            "rng": got["rng"].value.tolist(),
            "rng_in_place": got["rng"].value is rng and bool((rng == RANK).all()),
            "position": got["data"]["position"].value,
            "generator_in_place": got["generator"].value is generator,
            "generator_equal": bool((generator == generator_state(RANK)).all()),
            "model": got["model"]["w"].tolist(),
        }
    except ss.FailedPreconditionError as exc:
        out["error"] = str(exc)
        out["unchanged"] = bool((rng == -1).all() and (state["model"]["w"] == 0).all())
        rows = {
            "rng": ss.PerRank(np.zeros(3, np.int64), on_resize="all_rows"),
            "spread": ss.PerRank(np.zeros(2), on_resize="all_rows"),
            "data": {"position": ss.PerRank(-1, on_resize="all_rows")},
        }
        got = ss.Saver(rows).restore(prefix)
        out["all_rows"] = {
            "rng": got["rng"].rows.tolist(),
            "spread": got["spread"].rows.tolist(),
            "position": got["data"]["position"].rows.tolist(),
            "own_unchanged": bool((rows["rng"].value == 0).all()) and got["data"]["position"].value == -1,
            "wrapper_kept": got["rng"] is rows["rng"],
        }
    report(out)


if __name__ == "__main__":
    main()
