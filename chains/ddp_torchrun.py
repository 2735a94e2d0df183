"""Data-parallel training on CPU with torchrun: DDP (or FSDP2) + accumulation + clipping.

Run it on 2 processes (gloo backend, CPU):

    torchrun --nproc-per-node 2 chains/ddp_torchrun.py           # DDP + ChainedOptimizer
    torchrun --nproc-per-node 2 chains/ddp_torchrun.py --fsdp    # FSDP2 fully_shard, functional

Each rank trains on its own half of scikit-learn's handwritten digits (no download). The
same gradient processing runs in both modes:

    chain(accumulate_every(4), clip_by_norm(1.0)) in front of AdamW

* DDP: ``ChainedOptimizer(torch.optim.AdamW(...), chain)``; ``opt.no_sync(model)`` around
  each micro-batch's forward and backward, so DDP all-reduces once per window (the
  window's accumulated gradients), not once per micro-batch. The gradients are then the
  same on every rank, so clipping needs no communication.
* FSDP2: gradients are ``Shard(0)`` DTensors; ``gc.chain(..., gc.adamw(...))`` runs on them
  in functional style and ``gc.apply_updates_`` writes the sharded parameters.
  ``clip_by_norm`` all-reduces one number per window (the norm over all shards); the
  accumulator and Adam's moments are sharded like the parameters.

It prints the loss per epoch, whether the replicas agree, and the test accuracy (rank 0).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

# Imported before init_process_group on purpose. torch.distributed.nn.functional binds the
# default process group (group.WORLD) into its functions' default arguments when it is
# first imported, and DistributedDataParallel and fully_shard import it (through
# torch._dynamo). Imported after init_process_group, it keeps the group alive past
# destroy_process_group(): the group's gloo threads are then torn down by the
# interpreter's exit, which aborts about one run in eight ("terminate called without an
# active exception", SIGABRT). Imported first, it binds None.
import torch.distributed.nn  # noqa: F401
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import gradchain as gc


def load_data(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    # This rank's share of the training set (what a DistributedSampler would give).
    n = len(x_train) // world * world
    x_tr, y_tr = to_x(x_train)[rank:n:world], to_y(y_train)[rank:n:world]
    return x_tr, y_tr, to_x(x_test), to_y(y_test)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def replicas_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters (DDP: full copies; FSDP2: trivially,
    each rank owns its shard, so compare the gathered full tensors)."""
    flat = torch.cat(
        [
            p.detach().full_tensor().flatten()
            if hasattr(p, "full_tensor")
            else p.detach().flatten()
            for p in model.parameters()
        ]
    )
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    return bool(torch.equal(flat, ref))


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size per rank")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    if "RANK" not in os.environ:  # plain `python chains/ddp_torchrun.py`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_test, y_test = load_data(rank, world)
    model = make_model()

    clip_and_accumulate = gc.chain(gc.accumulate_every(args.accumulate), gc.clip_by_norm(1.0))
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = dict(model.named_parameters())  # DTensors, Shard(0)
        tx = gc.chain(clip_and_accumulate, gc.adamw(lr=args.lr, weight_decay=1e-4))
        state = tx.init({k: p.detach() for k, p in params.items()})
    else:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        opt = gc.ChainedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4),
            clip_and_accumulate,
        )

    steps = -(-len(x_train) // args.batch_size)
    applied = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        total = torch.zeros(())
        for i in range(steps):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            last = i == steps - 1  # flush: the epoch's last window may be short
            if args.fsdp:
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()  # reduce-scatters the gradients into Shard(0) DTensors
                grads = {k: p.grad for k, p in params.items()}
                live = {k: p.detach() for k, p in params.items()}
                updates, state = tx.update(grads, state, live, flush=last)
                gc.apply_updates_(params, updates)
                model.zero_grad()
                applied += int(gc.applied(state))
            else:
                with opt.no_sync(model, flush=last):  # all-reduce only when the window closes
                    loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                    loss.backward()
                opt.step(flush=last)
                opt.zero_grad()
                applied += int(opt.last_step_applied)
            total += loss.detach()
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1:2d}  train loss {total.item() / (steps * world):.4f}")
    elapsed = time.perf_counter() - start

    agree = replicas_agree(model)
    with torch.no_grad():  # every rank runs the forward (FSDP2 all-gathers the weights)
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    if rank == 0:
        mode = "FSDP2" if args.fsdp else "DDP"
        print(f"{mode} on {world} processes: {applied} updates applied, {elapsed:.1f}s")
        print(f"replicas agree: {agree}")
        print(f"test accuracy: {accuracy:.4f}")
    dist.barrier()
    return bool(args.fsdp)


if __name__ == "__main__":
    fsdp = main()
    dist.destroy_process_group()
    if fsdp:
        # With FSDP2, torch itself keeps the group alive past destroy_process_group():
        # DTensor's sharding-propagation cache holds the parameters' DTensorSpecs, whose
        # DeviceMesh holds the ProcessGroup in its _pg_registry. Its gloo threads would then
        # be torn down by the interpreter's exit, which can abort (see the import above).
        # Everything is done and flushed here: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
