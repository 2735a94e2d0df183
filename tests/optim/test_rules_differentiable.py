"""Pure mode is differentiable for every rule of tests/optim: gradients flow through two
updates to a tensor learning rate and to the incoming gradients, and are finite."""

from __future__ import annotations

import pytest
import torch

import gradchain as gc

RULES = ["adagrad", "adadelta", "adamax", "nadam", "radam", "rmsprop", "rprop", "asgd",
         "adafactor", "muon"]


@pytest.mark.parametrize("name", RULES)
def test_gradients_flow_through_update(name: str) -> None:
    torch.manual_seed(0)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    tx = getattr(gc, name)(lr)
    params = {"w": torch.randn(3, 2, dtype=torch.float64, requires_grad=True)}
    state = tx.init({"w": params["w"].detach()})
    g = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    updates, state = tx.update({"w": g}, state, params)
    updates, state = tx.update({"w": g * -0.5 + 0.1}, state, params)
    loss = gc.apply_updates(params, updates)["w"].square().sum()
    d_lr, d_g = torch.autograd.grad(loss, [lr, g], allow_unused=True)
    assert d_g is not None and torch.isfinite(d_g).all()
    if name == "rprop":
        # lr only sets the initial step sizes, taken as data at init (as torch does).
        assert d_lr is None
    else:
        assert d_lr is not None and torch.isfinite(d_lr) and d_lr != 0
