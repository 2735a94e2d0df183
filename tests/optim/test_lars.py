"""lars / scale_by_trust_ratio against optax.lars / optax.scale_by_trust_ratio."""

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
from gradchain.optim.lars import lars
from gradchain.testing import check_transformation
from gradchain.transforms import scale_by_trust_ratio

STEPS = 100
MASK = {"w": True, "b": False, "s": True}
CASES = [
    dict(lr=0.5),
    dict(lr=1.0, momentum=0.8, weight_decay=1e-2, trust_coefficient=0.01, eps=1e-3),
    dict(lr=0.3, nesterov=True, weight_decay=1e-3, weight_decay_mask=MASK, trust_ratio_mask=MASK),
    dict(lr=0.2, momentum=0.0, trust_coefficient=0.02),
]


def _optax_kw(kw: dict) -> dict:
    out = {("learning_rate" if k == "lr" else k): v for k, v in kw.items()}
    out.setdefault("weight_decay_mask", True)
    out.setdefault("trust_ratio_mask", True)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES)
def test_lars_matches_optax(kw: dict, dtype: torch.dtype) -> None:
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    ours = run_gradchain(lars(**kw), params, grads)
    with x64(dtype == torch.float64):
        ref = run_optax(lambda: optax.lars(**_optax_kw(kw)), params, grads)
    assert rel_err(ours, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(), dict(min_norm=0.5, trust_coefficient=2.0, eps=1e-2)])
def test_scale_by_trust_ratio_matches_optax(kw: dict, dtype: torch.dtype) -> None:
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params, grads = random_tree(dtype, 0), grads_seq(dtype, STEPS)
    # a zero param and a zero gradient leaf: ratio 1
    params["z"], grads[0]["s"] = torch.zeros(2, dtype=dtype), torch.zeros((), dtype=dtype)
    for g in grads:
        g["z"] = torch.ones(2, dtype=dtype)
    ours = run_gradchain(gc.chain(scale_by_trust_ratio(**kw), gc.scale(-0.1)), params, grads)
    with x64(dtype == torch.float64):
        ref = run_optax(
            lambda: optax.chain(optax.scale_by_trust_ratio(**kw), optax.scale(-0.1)), params, grads
        )
    assert rel_err(ours, ref) <= TOL[dtype]


def test_trust_ratio_of_half_leaves_runs_in_float32() -> None:
    params = {"w": torch.full((1000,), 300.0, dtype=torch.float16)}
    grads = {"w": torch.full((1000,), 300.0, dtype=torch.float16)}  # |g|^2 overflows fp16
    tx = scale_by_trust_ratio()
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], grads["w"])


def test_none_gradient_passes_and_keeps_its_momentum() -> None:
    params = random_tree(torch.float64, 0)
    tx = lars(0.5, weight_decay=1e-2)
    state = tx.init(params)
    g = grads_seq(torch.float64, 1)[0]
    _, state = tx.update(g, state, params)
    before = state[-1].trace["b"].clone()
    updates, state = tx.update({**g, "b": None}, state, params)
    assert updates["b"] is None and torch.equal(state[-1].trace["b"], before)


def test_state_round_trips_through_weights_only_load() -> None:
    params = random_tree(torch.float32, 0)
    tx = lars(0.5, trust_ratio_mask=MASK)
    state = tx.init(params)
    _, state = tx.update(grads_seq(torch.float32, 1)[0], state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    back = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    assert torch.equal(back[-1].trace["w"], state[-1].trace["w"])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="lars: nesterov=True requires momentum"):
        lars(0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="trust_coefficient"):
        scale_by_trust_ratio(trust_coefficient=-1.0)
    tx = scale_by_trust_ratio()
    with pytest.raises(ValueError, match="params is None"):
        tx.update({"w": torch.ones(1)}, tx.init(None))


def test_lars_obeys_the_laws() -> None:
    check_transformation(lars(0.5, weight_decay=1e-2, nesterov=True), max_examples=15)
    check_transformation(scale_by_trust_ratio(min_norm=1e-3, eps=1e-6), max_examples=15)


def test_lr_can_be_injected_into_the_state() -> None:
    check_injected_lr(lars, lr=0.5, weight_decay=1e-2)
