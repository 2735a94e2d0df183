"""ChainedOptimizer with DistributedDataParallel: two gloo processes on 127.0.0.1.

Each rank runs ``accumulate_every(4)`` with ``opt.no_sync(model)`` around the forward and
backward of every micro-batch. Both ranks must end with identical parameters, equal to one
process training on the combined batches, and DDP must all-reduce once per window (counted
by a comm hook that then does the default all-reduce).

The workers are this file run as a script by ``_spawn.run_ranks`` (bounded wait; a worker
still running then prints every thread's stack, then every process is killed, outputs kept).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from _spawn import run_ranks  # (tests/integration is on sys.path under pytest)
from torch.nn import functional as F

import gradchain as gc

WORLD = 2
EVERY = 4
WINDOWS = 3
MICRO = EVERY * WINDOWS
BATCH = 6
TIMEOUT_S = 120


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()


def micro_batch(i: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * i + rank)
    x = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(BATCH, 2, generator=gen, dtype=torch.float64)


def make_opt(model: torch.nn.Module) -> gc.ChainedOptimizer:
    return gc.ChainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gc.accumulate_every(EVERY)
    )


# --------------------------------------------------------------------------- worker
def worker(out: Path) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        model = DDP(make_model())
        allreduces = [0]

        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
            allreduces[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_allreduce)
        opt = make_opt(model)
        per_step, applied = [], []
        for i in range(MICRO):
            x, y = micro_batch(i, rank)
            before = allreduces[0]
            with opt.no_sync(model):
                loss = F.mse_loss(model(x), y)
                opt.backward(loss)
            opt.step()
            opt.zero_grad()
            per_step.append(allreduces[0] - before)
            applied.append(opt.last_step_applied)
        torch.save(
            {
                "params": [p.detach() for p in model.module.parameters()],
                "allreduces": per_step,
                "applied": applied,
            },
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- test
def single_process_reference() -> list[torch.Tensor]:
    model = make_model()
    opt = make_opt(model)
    for i in range(MICRO):
        xs, ys = zip(*(micro_batch(i, r) for r in range(WORLD)))
        F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def test_ddp_accumulation_with_no_sync(tmp_path: Path) -> None:
    job = run_ranks(__file__, [str(tmp_path)], nprocs=WORLD, timeout=TIMEOUT_S)
    job.check()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    closes = [(i + 1) % EVERY == 0 for i in range(MICRO)]
    for res in results:
        assert res["applied"] == closes
        # All-reduce only on the micro-step that closes a window, the same number of
        # buckets each time (one bucket for this small model).
        assert [n > 0 for n in res["allreduces"]] == closes
        assert len({n for n in res["allreduces"] if n}) == 1
        assert sum(res["allreduces"]) == WINDOWS * max(res["allreduces"])
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    for a, r in zip(results[0]["params"], single_process_reference()):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    # DDP keeps the gloo group's worker threads alive past destroy_process_group(); the
    # interpreter's teardown of them sometimes aborts (see chains/ddp_torchrun.py): the
    # results are saved, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
