"""``ChainedOptimizer(..., should_commit=manager.should_commit)`` with a real torchft
``Manager`` (issue 13, item 4): a ``LighthouseServer`` on localhost, 2 replica groups
(threads, one rank each, gloo), and one group killed in the middle of a step, after it
joined the step's quorum. The survivor's all-reduce fails, its manager votes no, and the
refused step changes nothing (parameters, the wrapped optimizer's state, the chain state);
it then carries on alone. The whole run equals, bit for bit, the same script with
torchft's own ``OptimizerWrapper`` (and ``clip_grad_norm_`` in the loop).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist

import gradchain as gc

torchft = pytest.importorskip("torchft")
from torchft._torchft import LighthouseServer  # noqa: E402
from torchft.manager import Manager  # noqa: E402
from torchft.optim import OptimizerWrapper  # noqa: E402
from torchft.process_group import ProcessGroupGloo  # noqa: E402

STEPS = 6
KILL = 3  # replica group 1 dies in the middle of this step
CLIP = 0.5
_INIT = threading.Lock()


class _Killed(Exception):
    pass


def _clone(tree: Any) -> Any:
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _same(a: Any, b: Any) -> bool:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    return sa == sb and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb)
    )


def replica_group(
    replica: int, lighthouse: str, kind: str, log: list[Any], started: threading.Barrier
) -> Any:
    store = dist.TCPStore(host_name="localhost", port=0, is_master=True,
                          wait_for_workers=False)
    with ExitStack() as stack:
        def state_dict() -> dict[str, Any]:
            return {"model": model.state_dict(), "optim": opt.state_dict()}

        def load_state_dict(sd: dict[str, Any]) -> None:
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])

        manager = Manager(
            pg=ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=1,
            load_state_dict=load_state_dict, state_dict=state_dict,
            replica_id=f"group{replica}", store_addr="localhost", store_port=store.port,
            rank=0, world_size=1, lighthouse_addr=lighthouse,
            timeout=timedelta(seconds=10), quorum_timeout=timedelta(seconds=30),
            use_async_quorum=False,
        )
        stack.callback(lambda: manager.shutdown(wait=False))
        with _INIT:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, 1)).double()
        inner = torch.optim.Adam(model.parameters(), lr=0.05)
        # Both managers heartbeat before the first quorum, so that it holds both groups
        # (with min_replicas=1 the lighthouse would otherwise start with whoever asks first).
        started.wait()
        time.sleep(0.5)
        if kind == "gradchain":
            opt: Any = gc.ChainedOptimizer(inner, gc.clip_by_norm(CLIP),
                                           should_commit=manager.should_commit)
        else:
            opt = OptimizerWrapper(manager, inner)
        while manager.current_step() < STEPS:
            step = manager.current_step()
            opt.zero_grad()
            if kind == "gradchain":
                manager.start_quorum()  # (OptimizerWrapper does it in zero_grad)
            gen = torch.Generator().manual_seed(100 * step + replica)
            x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
            y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if replica == 1 and step == KILL:
                manager.wait_quorum()  # it is in this step's quorum, then dies
                log.append((replica, step, "killed"))
                raise _Killed
            for p in model.parameters():
                manager.allreduce(p.grad).wait()
            before = _clone((list(model.parameters()), inner.state_dict(),
                             gc.to_state_dict(opt.tx_state) if kind == "gradchain" else None))
            if kind != "gradchain":
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            committed = manager.current_step() > step
            if kind == "gradchain":
                assert opt.last_step_applied == committed
            after = (list(model.parameters()), inner.state_dict(),
                     gc.to_state_dict(opt.tx_state) if kind == "gradchain" else None)
            log.append((replica, step, committed, _same(before, after)))
        return [p.detach().clone() for p in model.parameters()]


def run(kind: str) -> tuple[list[torch.Tensor], list[Any]]:
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=5000,
                                  heartbeat_timeout_ms=1000)
    log: list[Any] = []
    started = threading.Barrier(2)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(replica_group, r, lighthouse.address(), kind, log, started)
                       for r in range(2)]
            survivor = futures[0].result()
            with pytest.raises(_Killed):
                futures[1].result()
    finally:
        lighthouse.shutdown()
    return survivor, log


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    return {kind: run(kind) for kind in ("gradchain", "torchft")}


def test_the_survivors_refused_step_changes_nothing(runs: dict[str, Any]) -> None:
    _, log = runs["gradchain"]
    assert (1, KILL, "killed") in log
    survivor = [entry for entry in log if entry[0] == 0]
    refused = [entry for entry in survivor if not entry[2]]
    assert refused == [(0, KILL, False, True)]  # refused once, and nothing moved
    committed = [entry for entry in survivor if entry[2]]
    assert [e[1] for e in committed] == list(range(STEPS))  # then it carried on alone
    assert all(not unchanged for *_, unchanged in committed)  # committed steps do move


def test_the_run_equals_torchfts_optimizer_wrapper(runs: dict[str, Any]) -> None:
    ours, our_log = runs["gradchain"]
    theirs, their_log = runs["torchft"]
    assert [e[:3] for e in our_log if e[0] == 0] == [e[:3] for e in their_log if e[0] == 0]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_the_recipe_runs() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "chains" / "torchft_lighthouse.py"), "--steps", "5",
         "--kill-at", "2"],
        capture_output=True, text=True, timeout=180, check=True,
    ).stdout
    assert "group0 step 2 loss" in out and "refused, unchanged=True" in out, out
    assert "survivor: 5 committed steps, 1 refused step(s) that changed nothing" in out, out
