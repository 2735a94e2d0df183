"""gradchain's optimizer step on FSDP2 (``fully_shard``) params against torch's, measured
side by side in one 2-process gloo job on this machine (CPU).

Every rank builds the same MLP several times (same init), shards each copy with
``fully_shard`` over a 1-d mesh of the ranks, runs one forward/backward on each, and then
times the optimizer step alone (the gradients stay; each step clips them again), rounds
alternating between the contenders:

* ``torch``: ``clip_grad_norm_(foreach=True)`` + ``AdamW(foreach=True)`` (the reference);
* ``new``: ``update_and_apply_(chain(clip_by_norm(1.0), adamw(...)))``: the clip on the
  DTensor gradients (one all-reduce), torch's fused AdamW kernel over the local shards;
* ``old``: the same chain as the pure update (``tx.update(donate=True)`` +
  ``apply_updates_``: the path ``update_and_apply_`` took on DTensor params before; its
  in-place maths now runs over the local shards too, the rest leaf by leaf through
  DTensor);
* ``torch fused``: ``clip_grad_norm_(foreach=True)`` + ``AdamW(fused=True)``, for scale.

Rank 0 prints medians of the per-step time (wall, including the wait for the other rank
at the all-reduce) and of the per-round ratios to ``torch``.

Usage::

    python benchmarks/fsdp_speed.py                     # width 256, 6 layers
    python benchmarks/fsdp_speed.py --width 64 --layers 12 --rounds 20
    python benchmarks/fsdp_speed.py --smoke             # tiny, one round: checks it runs
    python benchmarks/fsdp_speed.py --rows old          # torch and the old path only
    torchrun --nproc-per-node 2 benchmarks/fsdp_speed.py   # as ranks of a torchrun job
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before init: see chains/ddp_torchrun.py)
import torch.multiprocessing as mp

import gradchain as gc

LR, WD, MAX_NORM = 1e-3, 1e-2, 1.0


def build(width: int, layers: int, mesh: Any, rank: int) -> torch.nn.Module:
    """The MLP (same init on every call), sharded, with the gradients of one batch."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1 + rank)
    model(torch.randn(8, width, generator=g)).square().mean().backward()
    return model


def contenders(
    width: int, layers: int, mesh: Any, rank: int, rows: list[str]
) -> dict[str, Callable[[], None]]:
    fns: dict[str, Callable[[], None]] = {}

    def torch_loop(**flag: bool) -> Callable[[], None]:
        """clip_grad_norm_ + AdamW(**flag) on a sharded model of its own."""
        model = build(width, layers, mesh, rank)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, **flag)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
            opt.step()

        return step

    fns["torch"] = torch_loop(foreach=True)

    tx = gc.chain(gc.clip_by_norm(MAX_NORM), gc.adamw(LR, weight_decay=WD))
    m_new = build(width, layers, mesh, rank)
    live = dict(m_new.named_parameters())
    new_state = [tx.init(live)]

    def new_step() -> None:
        grads = {k: p.grad for k, p in live.items()}
        new_state[0] = gc.update_and_apply_(tx, grads, new_state[0], live)

    fns["new"] = new_step

    m_old = build(width, layers, mesh, rank)
    live_old = dict(m_old.named_parameters())
    # Detached views of the params (their shards are the params' memory): what the
    # functional recipe passes, and what runs on releases before the local-shard path.
    old_params = {k: p.detach() for k, p in live_old.items()}
    old_state = [tx.init(old_params)]

    def old_step() -> None:
        grads = {k: p.grad for k, p in live_old.items()}
        updates, old_state[0] = tx.update(grads, old_state[0], old_params, donate=True)
        gc.apply_updates_(old_params, updates)

    fns["old"] = old_step

    fns["torch fused"] = torch_loop(fused=True)
    return {k: fns[k] for k in rows}


def timed(fn: Callable[[], None], inner: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def worker(rank: int, world: int, port: int | None, args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    fns = contenders(args.width, args.layers, mesh, rank, ["torch", *args.rows])
    for fn in fns.values():  # warm-up (state creation, DTensor's caches)
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # drift falls on all of them
        for name in order:
            times[name].append(timed(fns[name], args.inner))
    if rank == 0:
        n_tensors = 2 * args.layers
        n_params = args.layers * (args.width * args.width + args.width)
        print(
            f"FSDP2, {world} ranks (gloo, CPU, 1 thread each): MLP {args.layers} x Linear("
            f"{args.width}, {args.width}), {n_tensors} tensors, {n_params / 1e6:.2f}M params; "
            f"{args.rounds} rounds x {args.inner} steps"
        )
        print(f"{'step':<52}{'ms':>9}{'vs torch':>10}")
        labels = {
            "torch": "torch clip_grad_norm_ + AdamW(foreach=True)",
            "new": "gradchain update_and_apply_(clip, adamw)",
            "old": "gradchain update(donate) + apply_updates_",
            "torch fused": "torch clip_grad_norm_ + AdamW(fused=True)",
        }
        for name in names:
            ratios = [a / b for a, b in zip(times[name], times["torch"])]
            print(
                f"{labels[name]:<52}{statistics.median(times[name]) * 1e3:>9.3f}"
                f"{statistics.median(ratios):>10.2f}"
            )
        if args.smoke:
            print("smoke run: sizes are tiny, the figures mean nothing")
    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("RANK") is not None:
        # A rank process of its own (torchrun, the tests' launcher): FSDP2 keeps the group
        # alive past destroy_process_group() (DTensor's sharding cache holds the mesh,
        # which holds the group; see chains/ddp_torchrun.py), and the interpreter's
        # teardown of its gloo threads can abort. Everything is printed: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny MLP, one round")
    parser.add_argument("--rows", default="new,old,torch fused",
                        help="comma-separated rows besides torch: new, old, torch fused")
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r and r != "torch"]
    if args.smoke:
        args.width, args.layers, args.rounds, args.inner, args.warmup = 8, 2, 1, 1, 1
    if "RANK" in os.environ:  # started by torchrun (or the tests' launcher): one rank
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(worker, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main()
