"""Data-parallel training with a row-sharded embedding, checkpointed with ss.CheckpointManager.

    mpiexec -n 4 python -m mpi4py examples/mpi_train.py --ckpt-dir /tmp/run --steps 100
    mpiexec -n 2 python -m mpi4py examples/mpi_train.py --ckpt-dir /tmp/run --steps 200 --resume

The model is a bag-of-tokens classifier: a token embedding ``embedding`` [vocab, dim],
whose rows are split over the ranks (each rank owns and updates only its rows, as with
ZeRO/FSDP), then a dense layer ``dense/kernel`` [dim, classes] and ``dense/bias``
replicated on every rank. Each step, the global batch is split into a fixed number of
micro-batches dealt round-robin to the ranks; their gradients are summed with one
allreduce (each micro-batch in its own row, so the sum adds only zeros and is exact) and
then added up in micro-batch order. That makes every step bit-identical whatever the
number of ranks, so 100 steps on 4 ranks resumed to 200 on 2 ranks ends with exactly
the parameters of 200 steps straight.

The parameters are numpy arrays that the Variables use as they are (no copy) and that
training updates in place; the manager saves them every ``--save-every`` steps (in the
background), keeps ``--max-to-keep`` checkpoints across restarts, restores the newest one
that restores with ``--resume`` (on any number of ranks), and on SIGTERM or SIGUSR1 to any
rank saves the same step on every rank and exits (run it again with ``--resume``).
A checkpoint numbered ``s`` holds the parameters after ``s`` steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
from mpi4py import MPI

import shardsave as ss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", required=True, help="directory or URL (s3://bucket/run) for checkpoints")
    p.add_argument("--steps", type=int, default=200, help="train until this global step")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every this many steps")
    p.add_argument(
        "--resume", action="store_true", help="restore the latest checkpoint in --ckpt-dir, if any"
    )
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--tokens", type=int, default=6, help="tokens per example")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-to-keep", type=int, default=3)
    p.add_argument(
        "--storage-options",
        default=os.environ.get("SHARDSAVE_STORAGE_OPTIONS"),
        help="fsspec storage options as JSON (default: $SHARDSAVE_STORAGE_OPTIONS)",
    )
    p.add_argument("--dump", default=None, help="write the final parameters to this .npz (rank 0)")
    return p.parse_args(argv)


def row_range(rows: int, rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def batch(step: int, micro: int, args) -> tuple[np.ndarray, np.ndarray]:
    """Micro-batch ``micro`` of step ``step``: token ids and labels from a fixed teacher."""
    rng = np.random.default_rng([args.seed, step, micro])
    n = args.batch // args.micro_batches
    ids = rng.integers(0, args.vocab, size=(n, args.tokens))
    teacher = np.random.default_rng(args.seed).standard_normal((args.vocab, args.classes))
    labels = teacher[ids].sum(axis=1).argmax(axis=1)
    return ids, labels


def gradients(emb, kernel, bias, ids, labels, args):
    h = emb[ids].mean(axis=1)  # [n, dim]
    logits = h @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(probs[np.arange(n), labels] + 1e-12).sum()
    d_logits = probs
    d_logits[np.arange(n), labels] -= 1.0
    d_kernel = h.T @ d_logits
    d_bias = d_logits.sum(axis=0)
    d_h = d_logits @ kernel.T / args.tokens
    d_emb = np.zeros_like(emb)
    np.add.at(d_emb, ids, d_h[:, None, :])
    return loss, d_emb, d_kernel, d_bias


def config_of(args) -> dict:
    """What must match between a checkpoint and the run that resumes from it."""
    keys = ("vocab", "dim", "classes", "tokens", "batch", "micro_batches", "lr", "seed")
    return {k: getattr(args, k) for k in keys}


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    options = json.loads(args.storage_options) if args.storage_options else None
    lo, hi = row_range(args.vocab, rank, size)

    init = np.random.default_rng(args.seed + 1)
    full_emb = (init.standard_normal((args.vocab, args.dim)) * 0.1).astype(np.float32)
    # Each Variable uses the (writable, C-contiguous) array it is given, without a copy:
    # training below updates these arrays in place, saves read them, restores fill them.
    emb = ss.Variable("embedding", full_emb[lo:hi].copy(), global_shape=full_emb.shape, offset=(lo, 0))
    kernel = ss.Variable(
        "dense/kernel", (init.standard_normal((args.dim, args.classes)) * 0.1).astype(np.float32)
    )
    bias = ss.Variable("dense/bias", np.zeros(args.classes, np.float32))

    ckpt_dir = args.ckpt_dir.rstrip("/")
    mgr = ss.CheckpointManager(
        ckpt_dir,
        [emb, kernel, bias],
        max_to_keep=args.max_to_keep,
        save_interval_steps=args.save_every,
        checkpoint_name="model.ckpt",
        comm=comm,
        storage_options=options,
    )

    step = 0
    if args.resume:
        restored = mgr.restore_or_initialize()  # the newest checkpoint that restores, or None
        if restored is None:
            if rank == 0:
                print(f"no checkpoint in {ckpt_dir}: starting from scratch", flush=True)
        else:
            step = restored
            saved = (mgr.metadata(step) or {}).get("config")
            if saved is not None and saved != config_of(args):
                raise SystemExit(
                    f"{ckpt_dir}/model.ckpt-{step} was trained with {saved}, not {config_of(args)}"
                )
            if rank == 0:
                print(f"resumed from {ckpt_dir}/model.ckpt-{step} at step {step} on {size} ranks", flush=True)

    counts = comm.allgather(hi - lo)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]) * args.dim
    nparams = args.vocab * args.dim + args.dim * args.classes + args.classes
    preempted = False
    while step < args.steps:
        full = np.empty((args.vocab, args.dim), np.float32)
        comm.Allgatherv(emb.value, [full, np.array(counts) * args.dim, displs, MPI.FLOAT])
        grads = np.zeros((args.micro_batches, nparams + 1), np.float64)
        for m in range(rank, args.micro_batches, size):
            ids, labels = batch(step, m, args)
            loss, d_emb, d_kernel, d_bias = gradients(full, kernel.value, bias.value, ids, labels, args)
            grads[m] = np.concatenate([d_emb.ravel(), d_kernel.ravel(), d_bias, [loss]])
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)  # one writer per row: exact
        total = np.zeros(nparams + 1, np.float64)
        for m in range(args.micro_batches):  # fixed order: same bits on any rank count
            total += grads[m]
        total /= args.batch
        g_emb = total[: args.vocab * args.dim].reshape(args.vocab, args.dim)
        g_kernel = total[args.vocab * args.dim : -1 - args.classes].reshape(args.dim, args.classes)
        g_bias = total[-1 - args.classes : -1]
        # in place: the arrays the Variables hold are the ones the manager saves
        emb.value[...] -= args.lr * g_emb[lo:hi].astype(np.float32)
        kernel.value[...] -= args.lr * g_kernel.astype(np.float32)
        bias.value[...] -= args.lr * g_bias.astype(np.float32)
        loss = float(total[-1])
        step += 1  # the parameters are now those after `step` steps
        if rank == 0 and (step % 20 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {loss:.4f}", flush=True)
        # should_save is collective (it agrees on preemption notices): every rank calls it
        if mgr.should_save(step) or step == args.steps:
            mgr.save(step, metrics={"loss": loss}, metadata={"ranks": size, "config": config_of(args)})
            if rank == 0:
                print(f"step {step:4d}  saving {ckpt_dir}/model.ckpt-{step} in the background", flush=True)
        if mgr.reached_preemption(step):  # every rank agrees at the same step
            preempted = True
            break
    mgr.wait_until_finished()  # the last save is committed (or its error raised) here
    latest = mgr.latest_step()
    if rank == 0 and latest is not None:
        print(f"step {latest:4d}  saved {ckpt_dir}/model.ckpt-{latest}", flush=True)
    if rank == 0 and preempted:
        print(f"preempted at step {step}: run again with --resume to continue", flush=True)

    full = np.empty((args.vocab, args.dim), np.float32)
    comm.Allgatherv(emb.value, [full, np.array(counts) * args.dim, displs, MPI.FLOAT])
    if rank == 0:
        digest = hashlib.sha256()
        for arr in (full, kernel.value, bias.value):
            digest.update(np.ascontiguousarray(arr).tobytes())
        print(f"final step {step} parameters sha256 {digest.hexdigest()}", flush=True)
        if args.dump:
            np.savez(args.dump, embedding=full, kernel=kernel.value, bias=bias.value, step=step)
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
