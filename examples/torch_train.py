"""A small PyTorch model (CPU) trained data-parallel under MPI, checkpointed with ss.CheckpointManager.

    mpiexec -n 2 python -m mpi4py examples/torch_train.py --ckpt-dir /tmp/torch-run --steps 40
    mpiexec -n 3 python -m mpi4py examples/torch_train.py --ckpt-dir /tmp/torch-run --steps 80 --resume

Every rank holds the whole model (an MLP) and its Adam optimizer. Each step the global
batch is split into a fixed number of micro-batches dealt round-robin to the ranks; each
rank computes the gradients of its micro-batches, one allreduce of a [micro-batches,
params] array gathers them (each micro-batch in its own row, so the sum adds only zeros
and is exact) and every rank adds the rows up in micro-batch order. So every step gives
the same bits on any number of ranks, and 40 steps on 2 ranks resumed to 80 on 3 end
with exactly the parameters of 80 steps straight (``final ... sha256`` says so).

The checkpointed state is ``{"model": model.state_dict(), "optimizer":
optimizer.state_dict()}`` as it is: the tensors in it are the model's and the optimizer's
own, saved without a copy and restored in place, so the restored model needs no
``load_state_dict``. Two things make that work:

- Adam creates its per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``) at its first
  step, so a fresh optimizer has nothing to restore into. ``init_optimizer_state`` creates
  it up front (a step with zero gradients, then ``step`` set back to 0: what a fresh Adam
  would hold when it starts).
- Torch's intra-op threads can change the order of a sum, hence the bits: one thread per
  rank (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from mpi4py import MPI

import shardsave as ss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", required=True, help="directory or URL (s3://bucket/run) for checkpoints")
    p.add_argument("--steps", type=int, default=80, help="train until this global step")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every this many steps")
    p.add_argument(
        "--resume", action="store_true", help="restore the latest checkpoint in --ckpt-dir, if any"
    )
    p.add_argument("--inputs", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch", type=int, default=48, help="global batch size")
    p.add_argument("--micro-batches", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-to-keep", type=int, default=3)
    p.add_argument(
        "--storage-options",
        default=os.environ.get("SHARDSAVE_STORAGE_OPTIONS"),
        help="fsspec storage options as JSON (default: $SHARDSAVE_STORAGE_OPTIONS)",
    )
    return p.parse_args(argv)


def micro_batch(step: int, micro: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of step ``step``: inputs and the labels of a fixed teacher."""
    rng = np.random.default_rng([args.seed, step, micro])
    n = args.batch // args.micro_batches
    x = rng.standard_normal((n, args.inputs)).astype(np.float32)
    teacher = np.random.default_rng(args.seed).standard_normal((args.inputs, args.classes))
    y = np.tanh(x @ teacher).argmax(axis=1)
    return torch.from_numpy(x), torch.from_numpy(y)


def init_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give Adam its per-parameter state now (it makes it lazily at the first step), as a
    fresh optimizer would start: zero moments and ``step`` 0. A restore fills it in place."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: the moments stay 0 and the parameters do not move
    for state in optimizer.state.values():
        state["step"].zero_()
    optimizer.zero_grad(set_to_none=True)


def config_of(args) -> dict:
    """What must match between a checkpoint and the run that resumes from it."""
    keys = ("inputs", "hidden", "classes", "batch", "micro_batches", "lr", "seed")
    return {k: getattr(args, k) for k in keys}


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    options = json.loads(args.storage_options) if args.storage_options else None
    torch.set_num_threads(1)

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(args.inputs, args.hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(args.hidden, args.classes),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, foreach=False, fused=False)
    init_optimizer_state(model, optimizer)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    nparams = sum(sizes)

    ckpt_dir = args.ckpt_dir.rstrip("/")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    mgr = ss.CheckpointManager(
        ckpt_dir,
        state,
        max_to_keep=args.max_to_keep,
        save_interval_steps=args.save_every,
        comm=comm,
        storage_options=options,
    )

    step = 0
    if args.resume:
        restored = mgr.restore_or_initialize()  # fills the model's and optimizer's tensors in place
        if restored is None:
            if rank == 0:
                print(f"no checkpoint in {ckpt_dir}: starting from scratch", flush=True)
        else:
            step = restored
            saved = (mgr.metadata(step) or {}).get("config")
            if saved is not None and saved != config_of(args):
                raise SystemExit(f"{ckpt_dir}/ckpt-{step} was trained with {saved}, not {config_of(args)}")
            if rank == 0:
                print(f"resumed from {ckpt_dir}/ckpt-{step} at step {step} on {size} ranks", flush=True)

    preempted = False
    while step < args.steps:
        grads = np.zeros((args.micro_batches, nparams + 1), np.float64)
        for m in range(rank, args.micro_batches, size):
            x, y = micro_batch(step, m, args)
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            grads[m, :nparams] = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
            grads[m, nparams] = loss.item()
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)  # one writer per row: exact
        total = np.zeros(nparams + 1, np.float64)
        for m in range(args.micro_batches):  # fixed order: same bits on any rank count
            total += grads[m]
        total /= args.batch
        flat = torch.from_numpy(total[:nparams].astype(np.float32))
        for p, g in zip(params, torch.split(flat, sizes), strict=True):
            p.grad = g.view_as(p)
        optimizer.step()  # updates the parameters and Adam's state in place
        loss = float(total[nparams])
        step += 1  # the state is now that after `step` steps
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {loss:.4f}", flush=True)
        if mgr.should_save(step) or step == args.steps:  # collective: every rank calls it
            mgr.save(step, metrics={"loss": loss}, metadata={"ranks": size, "config": config_of(args)})
        if mgr.reached_preemption(step):
            preempted = True
            break
    mgr.wait_until_finished()
    if rank == 0 and preempted:
        print(f"preempted at step {step}: run again with --resume to continue", flush=True)
    if rank == 0:
        print(f"final step {step} parameters sha256 {digest(model)}", flush=True)
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
