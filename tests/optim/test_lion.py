"""lion / scale_by_lion against optax.lion and lion_pytorch.Lion on the same inputs."""

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
    run_torch,
    x64,
)

import gradchain as gc
from gradchain.optim.lion import ScaleByLionState, lion, scale_by_lion
from gradchain.testing import check_transformation

STEPS = 100
CASES = [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0),
    dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1),
    dict(lr=1e-3, betas=(0.0, 0.5), weight_decay=1.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES)
def test_lion_matches_lion_pytorch(kw: dict, dtype: torch.dtype) -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    ours = run_gradchain(lion(**kw), params, grads)
    ref, _ = run_torch(lambda ps: lion_pytorch.Lion(ps, **kw), params, grads)
    assert rel_err(ours, ref) <= TOL[dtype]


def test_lion_decoupled_weight_decay_matches_lion_pytorch() -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    kw = dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True)
    params, grads = random_tree(torch.float64, 0), grads_seq(torch.float64, STEPS)
    ours = run_gradchain(lion(**kw), params, grads)
    ref, _ = run_torch(lambda ps: lion_pytorch.Lion(ps, **kw), params, grads)
    assert rel_err(ours, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES)
def test_lion_matches_optax(kw: dict, dtype: torch.dtype) -> None:
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    ours = run_gradchain(lion(**kw), params, grads)
    b1, b2 = kw["betas"]
    with x64(dtype == torch.float64):
        ref = run_optax(
            lambda: optax.lion(kw["lr"], b1=b1, b2=b2, weight_decay=kw["weight_decay"]),
            params, grads,
        )
    assert rel_err(ours, ref) <= TOL[dtype]


def test_lion_schedule_matches_optax() -> None:
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params, grads = random_tree(torch.float64, 0), grads_seq(torch.float64, STEPS)
    # A float64 schedule: gradchain's built-in schedules return float32 values.
    ours = run_gradchain(
        lion(lambda c: 1e-2 * 0.98 ** c.to(torch.float64), weight_decay=0.1), params, grads
    )
    with x64(True):
        ref = run_optax(lambda: optax.lion(lambda c: 1e-2 * 0.98**c, weight_decay=0.1), params, grads)
    assert rel_err(ours, ref) <= 1e-12


def test_scale_by_lion_momentum_is_bitwise_lion_pytorch() -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params, grads = random_tree(torch.float32, 0), grads_seq(torch.float32, 20)
    tx = scale_by_lion(0.9, 0.99)
    state = tx.init(params)
    for g in grads:
        _, state = tx.update(g, state, params)
    _, opt = run_torch(lambda ps: lion_pytorch.Lion(ps, lr=1e-3), params, grads)
    for k, p in zip(params, opt.param_groups[0]["params"]):
        assert torch.equal(state.mu[k], opt.state[p]["exp_avg"])


def test_none_gradient_keeps_its_momentum() -> None:
    params = random_tree(torch.float64, 0)
    tx = lion(1e-2, weight_decay=0.1)
    state = tx.init(params)
    g = grads_seq(torch.float64, 1)[0]
    updates, state = tx.update(g, state, params)
    before = state[0].mu["b"].clone()
    updates, state = tx.update({**g, "b": None}, state, params)
    assert updates["b"] is None
    assert torch.equal(state[0].mu["b"], before)
    assert int(state[0].count) == 2


def test_state_round_trips_through_weights_only_load() -> None:
    params = random_tree(torch.float32, 0)
    tx = lion(1e-2)
    state = tx.init(params)
    _, state = tx.update(grads_seq(torch.float32, 1)[0], state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    back = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    assert isinstance(back[0], ScaleByLionState)
    assert torch.equal(back[0].mu["w"], state[0].mu["w"]) and int(back[0].count) == 1


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="lion: invalid beta"):
        lion(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="weight_decay"):
        lion(weight_decay=-1.0)
    with pytest.raises(ValueError, match="initial learning rate"):
        lion(0.0, weight_decay=0.1, decoupled_weight_decay=True)


def test_lion_obeys_the_laws() -> None:
    # compile and vmap on this one rule only (CI time); see the other modules for the rest
    check_transformation(lion(1e-2, weight_decay=0.1), vmap=True, compile=True, compile_examples=1,
                         max_examples=15)


def test_lr_can_be_injected_into_the_state() -> None:
    check_injected_lr(lion, lr=1e-2, weight_decay=0.1)
