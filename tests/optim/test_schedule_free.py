"""schedule_free_adamw / schedule_free_sgd / schedule_free_eval_params against the
authors' schedulefree.AdamWScheduleFree / SGDScheduleFree (train params y and, after
``optimizer.eval()``, the eval params x)."""

from __future__ import annotations

import io

import pytest
import torch
from _modern_refs import TOL, check_injected_lr, grads_seq, random_tree, rel_err, run_torch

import gradchain as gc
from gradchain.optim.schedule_free import (
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)
from gradchain.testing import check_transformation

STEPS = 100
ADAMW = [
    dict(lr=1e-2),
    dict(lr=2e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=10),
    dict(lr=5e-3, betas=(0.95, 0.9), r=1.0, weight_lr_power=1.0, warmup_steps=150),
]
SGD = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.5, weight_decay=0.01, warmup_steps=20),
    dict(lr=0.2, momentum=0.99, r=0.5, weight_lr_power=0.0),
]


def _run(tx: gc.GradientTransformation, params: dict, grads: list[dict]) -> tuple[dict, dict]:
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = gc.apply_updates(params, updates)
    return params, schedule_free_eval_params(params, state)


def _reference(cls: type, kw: dict, params: dict, grads: list[dict]) -> tuple[dict, dict]:
    y, opt = run_torch(lambda ps: cls(ps, **kw), params, grads, before_step=lambda o: o.train())
    y = {k: v.clone() for k, v in y.items()}
    opt.eval()
    x = {k: p.detach().clone() for k, p in zip(params, opt.param_groups[0]["params"])}
    return y, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", ADAMW)
def test_schedule_free_adamw_matches_the_authors(kw: dict, dtype: torch.dtype) -> None:
    schedulefree = pytest.importorskip("schedulefree")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    y, x = _run(schedule_free_adamw(**kw), params, grads)
    ref_y, ref_x = _reference(schedulefree.AdamWScheduleFree, kw, params, grads)
    assert rel_err(y, ref_y) <= TOL[dtype]
    assert rel_err(x, ref_x) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", SGD)
def test_schedule_free_sgd_matches_the_authors(kw: dict, dtype: torch.dtype) -> None:
    schedulefree = pytest.importorskip("schedulefree")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    y, x = _run(schedule_free_sgd(**kw), params, grads)
    ref_y, ref_x = _reference(schedulefree.SGDScheduleFree, kw, params, grads)
    assert rel_err(y, ref_y) <= TOL[dtype]
    assert rel_err(x, ref_x) <= TOL[dtype]


def test_none_gradients_match_the_authors() -> None:
    # The reference skips params without .grad: their z and exp_avg_sq stay, the step
    # count and the averaging weights advance for the group.
    schedulefree = pytest.importorskip("schedulefree")
    params, grads = random_tree(torch.float64, 0), grads_seq(torch.float64, 30)
    for t, g in enumerate(grads):
        if t % 3 == 1:
            g["b"] = None
    kw = dict(lr=1e-2, weight_decay=0.05)
    y, x = _run(schedule_free_adamw(**kw), params, grads)
    ref_y, ref_x = _reference(schedulefree.AdamWScheduleFree, kw, params, grads)
    assert rel_err(y, ref_y) <= 1e-12 and rel_err(x, ref_x) <= 1e-12


def test_none_gradient_passes_through_and_keeps_its_state() -> None:
    params = random_tree(torch.float64, 0)
    tx = schedule_free_adamw(1e-2)
    g = grads_seq(torch.float64, 1)[0]
    _, state = tx.update(g, tx.init(params), params)
    z, nu = state.z["b"].clone(), state.nu["b"].clone()
    updates, state = tx.update({**g, "b": None}, state, params)
    assert updates["b"] is None
    assert torch.equal(state.z["b"], z) and torch.equal(state.nu["b"], nu)


def test_eval_params_inside_a_partition_and_argument_order() -> None:
    params = random_tree(torch.float64, 0)
    tx = gc.partition(
        {"sf": schedule_free_sgd(0.1), "plain": gc.sgd(0.1)},
        lambda p: {k: ("sf" if k == "w" else "plain") for k in p},
    )
    state = tx.init(params)
    for g in grads_seq(torch.float64, 3):
        updates, state = tx.update(g, state, params)
        params = gc.apply_updates(params, updates)
    x = schedule_free_eval_params(params, state)
    assert x["b"] is params["b"] and not torch.equal(x["w"], params["w"])
    sf = gc.tree_get(state, ScheduleFreeState)
    assert torch.allclose(x["w"], sf.z["w"] + (params["w"] - sf.z["w"]) / 0.9)
    with pytest.raises(TypeError, match="first argument is a state"):
        schedule_free_eval_params(state, params)
    with pytest.raises(TypeError, match="no ScheduleFreeState"):
        schedule_free_eval_params(params, gc.sgd(0.1).init(params))


def test_state_round_trips_through_weights_only_load() -> None:
    params = random_tree(torch.float32, 0)
    tx = schedule_free_adamw(1e-2, warmup_steps=5)
    state = tx.init(params)
    _, state = tx.update(grads_seq(torch.float32, 1)[0], state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    back = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    for a, b in zip(back, state):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(back.z["w"], state.z["w"]) and torch.equal(back.nu["w"], state.nu["w"])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="schedule_free_sgd: momentum must be > 0"):
        schedule_free_sgd(momentum=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedule_free_adamw(warmup_steps=-1)
    with pytest.raises(ValueError, match="params is None"):
        schedule_free_adamw().init(None)


def test_schedule_free_obeys_the_laws() -> None:
    check_transformation(schedule_free_adamw(1e-2, weight_decay=0.1, warmup_steps=2),
                         max_examples=15)
    check_transformation(schedule_free_sgd(0.1, r=1.0), max_examples=15)


def test_lr_can_be_injected_into_the_state() -> None:
    check_injected_lr(schedule_free_adamw, lr=1e-2, weight_decay=0.1)
    check_injected_lr(schedule_free_sgd, lr=0.1, warmup_steps=3)
