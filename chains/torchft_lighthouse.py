"""torchft with a real Lighthouse and Manager: two replica groups, one dies mid-step.

``ChainedOptimizer(..., should_commit=manager.should_commit)`` takes torchft's vote: when a
peer dies during a step, the survivor's all-reduce fails, its manager votes no, and the
call leaves no trace (weights, Adam's state and the chain's state as before it); the next
quorum holds the survivor alone and training carries on. Call ``manager.start_quorum()``
before each step (torchft's ``OptimizerWrapper`` does it in ``zero_grad``).

This script starts a ``LighthouseServer`` on localhost and runs the two replica groups as
threads (one rank each, gloo), as torchft's own integration tests do; in production each
group is a ``torchrun`` job pointed at the lighthouse (``TORCHFT_LIGHTHOUSE``).

Run: ``python chains/torchft_lighthouse.py`` (needs ``pip install torchft``; ~10 s).
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torchft._torchft import LighthouseServer
from torchft.manager import Manager
from torchft.process_group import ProcessGroupGloo

import gradchain as gc


class Killed(Exception):
    pass


def replica_group(group: int, lighthouse: str, args: argparse.Namespace,
                  started: threading.Barrier) -> list[str]:
    store = dist.TCPStore(host_name="localhost", port=0, is_master=True,
                          wait_for_workers=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=1,
        load_state_dict=load_state_dict, state_dict=state_dict, replica_id=f"group{group}",
        store_addr="localhost", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=lighthouse, timeout=timedelta(seconds=10), use_async_quorum=False,
    )
    opt = gc.ChainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0)),
        should_commit=manager.should_commit,
    )
    lines = []
    started.wait()
    time.sleep(0.5)  # both groups heartbeat before the first quorum
    try:
        while manager.current_step() < args.steps:
            step = manager.current_step()
            opt.zero_grad()
            manager.start_quorum()
            gen = torch.Generator().manual_seed(100 * step + group)
            x = torch.randn(16, 4, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
            loss.backward()
            if group == 1 and step == args.kill_at:
                manager.wait_quorum()
                raise Killed(f"group1 killed in step {step}")
            for p in model.parameters():
                manager.allreduce(p.grad).wait()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            verdict = "committed" if opt.last_step_applied else "refused, unchanged=" + str(
                unchanged)
            assert opt.last_step_applied or unchanged
            lines.append(f"group{group} step {step} loss {loss.item():.4f} {verdict} "
                         f"(participants {manager.num_participants()})")
    finally:
        manager.shutdown(wait=False)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kill-at", type=int, default=3)
    args = parser.parse_args()
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=5000,
                                  heartbeat_timeout_ms=1000)
    started = threading.Barrier(2)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(replica_group, g, lighthouse.address(), args, started)
                       for g in range(2)]
            survivor = futures[0].result()
            try:
                futures[1].result()
            except Killed as err:
                print(err)
    finally:
        lighthouse.shutdown()
    print("\n".join(survivor))
    refused = sum("refused" in line for line in survivor)
    print(f"survivor: {args.steps} committed steps, {refused} refused step(s) that changed nothing")


if __name__ == "__main__":
    main()
