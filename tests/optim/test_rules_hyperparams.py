"""Every rule of tests/optim works with inject_hyperparams: injected hyperparameters give
the same trajectory as the plain rule (pure and update_and_apply_, the latter equal to
torch's kernel), and a learning rate changed with set_hyperparams mid-run matches torch
with the same change to its param group."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_parity import make_grads, make_params

import gradchain as gc

# rule, torch class, injected hyperparameters, torch flags for update_and_apply_'s kernel
RULES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("adagrad", "Adagrad", dict(lr=0.05, weight_decay=0.1), {"fused": True}),
    ("adadelta", "Adadelta", dict(lr=0.5, rho=0.8), {"foreach": True}),
    ("adamax", "Adamax", dict(lr=1e-2, eps=1e-6), {"foreach": True}),
    ("nadam", "NAdam", dict(lr=1e-2, momentum_decay=0.01), {"foreach": True}),
    ("radam", "RAdam", dict(lr=1e-2, weight_decay=0.1), {"foreach": True}),
    ("rmsprop", "RMSprop", dict(lr=1e-2, momentum=0.5), {"foreach": True}),
    ("asgd", "ASGD", dict(lr=1e-2, lambd=1e-3), {"foreach": True}),
    ("adafactor", "Adafactor", dict(lr=0.1, weight_decay=0.1), {"foreach": True}),
    ("muon", "Muon", dict(lr=2e-2, weight_decay=0.1), {}),
]
SHAPES = {"w": (7, 5), "v": (4, 6)}


@pytest.mark.parametrize("name, cls, hyper, flags", RULES, ids=[r[0] for r in RULES])
def test_injected_hyperparameters(name: str, cls: str, hyper: dict[str, Any],
                                  flags: dict[str, Any]) -> None:
    rule = getattr(gc, name)
    static = tuple(k for k in hyper if k != "lr")  # only lr may be a tensor in these rules
    injected = gc.inject_hyperparams(rule, static_args=static)(**hyper)
    plain = rule(**hyper)
    params = make_params(torch.float32, shapes=SHAPES)
    ours, ref = dict(params), dict(params)
    live = {k: v.clone() for k, v in params.items()}
    tparams = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = getattr(torch.optim, cls)(list(tparams.values()), **hyper, **flags)
    s, r, sl = injected.init(ours), plain.init(ref), injected.init(live)
    for t in range(12):
        if t == 6:  # a new learning rate, mid-run, on both sides
            s = gc.set_hyperparams(s, lr=hyper["lr"] / 2)
            sl = gc.set_hyperparams(sl, lr=hyper["lr"] / 2)
            plain = rule(**{**hyper, "lr": hyper["lr"] / 2})
            for group in opt.param_groups:
                group["lr"] = hyper["lr"] / 2
        grads = make_grads(params, t)
        u, s = injected.update(grads, s, ours)
        ours = gc.apply_updates(ours, u)
        v, r = plain.update(grads, r, ref)
        ref = gc.apply_updates(ref, v)
        sl = gc.update_and_apply_(injected, {k: g.clone() for k, g in grads.items()}, sl, live)
        for k, p in tparams.items():
            p.grad = grads[k].clone()
        opt.step()
    for k in params:
        assert torch.equal(ours[k], ref[k]), k
        assert torch.equal(live[k], tparams[k].detach()), k
