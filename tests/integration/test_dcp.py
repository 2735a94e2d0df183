"""``torch.distributed.checkpoint`` with ``ChainedOptimizer`` itself (issue 13, item 2),
single process: ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` and
``dcp.save`` / ``dcp.load`` carry the chain state (accumulator mid-window, loss scale,
counters) with the wrapped optimizer's; DCP's initialisation step (zero gradients, lr 0)
leaves the window and the wrapped optimizer alone; and a checkpoint taken at any step, the
first accumulation window included, leaves the run bit-identical to one without it, both
for the run that goes on and for a fresh process that resumes from it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.distributed.checkpoint as dcp
from _spawn import run_ranks  # (tests/integration is on sys.path under pytest)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import gradchain as gc

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

DT = torch.float64
STEPS = 10
EVERY = 3


def make(seed: int = 0) -> tuple[torch.nn.Module, gc.ChainedOptimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    model = model.to(DT)
    inner = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
    tx = gc.chain(gc.accumulate_every(EVERY), gc.loss_scale(init_scale=2.0**4),
                  gc.clip_by_norm(0.5))
    return model, gc.ChainedOptimizer(inner, tx)


def micro_step(model: torch.nn.Module, opt: gc.ChainedOptimizer, i: int) -> None:
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    y = torch.randn(4, 2, generator=gen, dtype=DT)
    opt.backward(torch.nn.functional.mse_loss(model(x), y))
    opt.step()
    opt.zero_grad()


def snapshot(model: torch.nn.Module, opt: gc.ChainedOptimizer) -> Any:
    return (
        [p.detach().clone() for p in model.parameters()],
        gc.to_state_dict(opt.tx_state),
        optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                        opt.optimizer.state_dict()),
    )


def assert_same(a: Any, b: Any) -> None:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


@pytest.fixture(scope="module")
def reference() -> Any:
    model, opt = make()
    for i in range(STEPS):
        micro_step(model, opt, i)
    return snapshot(model, opt)


def test_get_and_set_optimizer_state_dict_carry_the_chain_state() -> None:
    model, opt = make()
    for i in range(4):  # one applied window, one micro-step into the next
        micro_step(model, opt, i)
    sd = get_optimizer_state_dict(model, opt)
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {n for n, _ in model.named_parameters()}  # FQNs
    chain_sd = sd["param_groups"][0]["gradchain"]
    assert_same(chain_sd["transform"], gc.to_state_dict(opt.tx_state))
    assert int(gc.tree_get(opt.tx_state, "mini_step")) == 1

    model2, opt2 = make(seed=1)
    set_model_state_dict(model2, get_model_state_dict(model))
    # (the dict holds the live tensors, as torch's does: load a copy into the twin)
    set_optimizer_state_dict(model2, opt2, optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, sd))
    assert_same(gc.to_state_dict(opt2.tx_state), gc.to_state_dict(opt.tx_state))
    assert_same(opt2.optimizer.state_dict()["state"], opt.optimizer.state_dict()["state"])
    for i in range(4, STEPS):
        micro_step(model, opt, i)
        micro_step(model2, opt2, i)
    assert_same(snapshot(model2, opt2), snapshot(model, opt))


def test_the_initialisation_step_leaves_the_window_and_the_wrapped_optimizer_alone() -> None:
    model, opt = make()
    for i in range(2):  # inside the first window: no applied step yet, no Adam state
        micro_step(model, opt, i)
    assert not opt.optimizer.state
    before = snapshot(model, opt)
    calls = []
    handle = opt.optimizer.register_step_post_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        # After held-back steps, DCP's lr-0 step is no scheduler's doing: no warning.
        warnings.simplefilter("error")
        get_optimizer_state_dict(model, opt)  # runs DCP's _init_optim_state
    handle.remove()
    assert calls == [1]  # DCP's zero-lr step made the wrapped state...
    params, tx, _ = snapshot(model, opt)
    assert_same((params, tx), before[:2])  # ...and changed no parameter nor the window
    assert int(gc.tree_get(opt.tx_state, "mini_step")) == 2
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("at", range(STEPS - 1))
def test_a_checkpoint_at_any_step_leaves_the_run_bit_identical(
    at: int, reference: Any, tmp_path: Path
) -> None:
    model, opt = make()
    for i in range(at + 1):
        micro_step(model, opt, i)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=tmp_path)

    # A fresh process resumes from it ...
    model2, opt2 = make(seed=1)
    fresh = {"model": get_model_state_dict(model2),
             "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(fresh, checkpoint_id=tmp_path)
    set_model_state_dict(model2, fresh["model"])
    set_optimizer_state_dict(model2, opt2, fresh["optim"])
    # ... and the run that took the checkpoint goes on: both end where the reference does.
    for i in range(at + 1, STEPS):
        micro_step(model, opt, i)
        micro_step(model2, opt2, i)
    assert_same(snapshot(model, opt), reference)
    assert_same(snapshot(model2, opt2), reference)


def test_the_bare_wrapped_optimizer_would_drift() -> None:
    """Negative control: the same checkpoint calls on a plain Adam before its first step do
    change its trajectory (DCP's zero-lr step counts a step), which the adapter avoids."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(DT)
    twin = torch.nn.Linear(3, 2).to(DT)
    twin.load_state_dict(model.state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (model, twin)]
    get_optimizer_state_dict(twin, opts[1])
    for m, o in zip((model, twin), opts):
        m(torch.ones(1, 3, dtype=DT)).sum().backward()
        o.step()
    assert not torch.equal(model.weight, twin.weight)


# --------------------------------------------------------------------------- FSDP2
def test_fsdp2_two_processes_checkpoint_with_the_adapter_itself(tmp_path: Path) -> None:
    """FSDP2 on 2 gloo processes (``_dcp_fsdp_worker.py``): DCP's helpers given the adapter
    save and reshard the chain state (the accumulator is sharded like the parameters); a
    checkpoint inside the first window (AdamW without state yet) and one mid-window later
    both leave the saving run and a resumed one bit-identical to a run without them."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    job = run_ranks(Path(__file__).with_name("_dcp_fsdp_worker.py"), [str(tmp_path)],
                    nprocs=2, timeout=240)
    results = [json.loads(line[len("GC_RESULT "):]) for out in job.outputs
               for line in out.splitlines() if line.startswith("GC_RESULT ")]
    assert len(results) == 4 and all(r["ok"] for r in results), job.outputs
    by_k = {r["data"]["k"]: r["data"] for r in results}
    assert by_k[1] == {"k": 1, "window": 1, "had_state": False}  # first window, no Adam state
    assert by_k[3] == {"k": 3, "window": 1, "had_state": True}
