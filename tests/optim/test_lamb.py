"""lamb against optax.lamb."""

from __future__ import annotations

import io

import pytest
import torch
from _modern_refs import (
    TOL,
    check_injected_lr,
    grads_seq,
    random_tree,
    rel_err,
    run_gradchain,
    run_optax,
    x64,
)

import gradchain as gc
from gradchain.optim.lamb import lamb
from gradchain.testing import check_transformation

STEPS = 100
CASES = [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
    dict(lr=1e-2, betas=(0.0, 0.9), weight_decay=0.01, mask={"w": True, "b": False, "s": False}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES)
def test_lamb_matches_optax(kw: dict, dtype: torch.dtype) -> None:
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    ours = run_gradchain(lamb(**kw), params, grads)
    b1, b2 = kw.get("betas", (0.9, 0.999))
    okw = dict(b1=b1, b2=b2, eps=kw.get("eps", 1e-6), weight_decay=kw.get("weight_decay", 0.0),
               mask=kw.get("mask"))
    with x64(dtype == torch.float64):
        ref = run_optax(lambda: optax.lamb(kw["lr"], **okw), params, grads)
    assert rel_err(ours, ref) <= TOL[dtype]


def test_none_gradient_keeps_its_moments() -> None:
    params = random_tree(torch.float64, 0)
    tx = lamb(1e-2, weight_decay=0.1)
    state = tx.init(params)
    g = grads_seq(torch.float64, 1)[0]
    _, state = tx.update(g, state, params)
    mu, nu = state[0].mu["s"].clone(), state[0].nu["s"].clone()
    updates, state = tx.update({**g, "s": None}, state, params)
    assert updates["s"] is None
    assert torch.equal(state[0].mu["s"], mu) and torch.equal(state[0].nu["s"], nu)


def test_state_round_trips_through_weights_only_load() -> None:
    params = random_tree(torch.float32, 0)
    tx = lamb(1e-2, weight_decay=0.1)
    state = tx.init(params)
    _, state = tx.update(grads_seq(torch.float32, 1)[0], state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    back = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    assert torch.equal(back[0].nu["w"], state[0].nu["w"]) and int(back[0].count) == 1


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="lamb: invalid beta"):
        lamb(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lamb: invalid epsilon"):
        lamb(eps=-1.0)


def test_lamb_obeys_the_laws() -> None:
    check_transformation(lamb(1e-2, weight_decay=0.1), max_examples=15)


def test_lr_can_be_injected_into_the_state() -> None:
    check_injected_lr(lamb, lr=1e-2, weight_decay=0.1)
