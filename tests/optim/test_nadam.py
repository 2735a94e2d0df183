"""gradchain.nadam against torch.optim.NAdam (parity for every option over 100 steps,
None gradients, state round trip, validation, laws)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_parity import DTYPES, RTOL, check_binding, check_mid_run_reload, run_parity

import gradchain as gc
from gradchain.optim.nadam import nadam, scale_by_nadam
from gradchain.testing import check_transformation

CASES = [
    dict(),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, momentum_decay=0.1),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    dict(lr=1e-2, maximize=True),
    dict(lr=2e-2, momentum_decay=0.01, weight_decay=0.2, decoupled_weight_decay=True,
         maximize=True),
]


# Every option against torch's single-tensor implementation; torch's foreach
# implementation (its default on accelerators) on the defaults and the all-options case.
GRID = [(kw, dt, False) for kw in CASES for dt in DTYPES] + [
    (kw, dt, True) for kw in (CASES[0], CASES[-1]) for dt in DTYPES
]


@pytest.mark.parametrize(
    "kwargs, dtype, foreach", GRID,
    ids=[f"{kw}-{str(dt)[6:]}-{'foreach' if fe else 'single'}" for kw, dt, fe in GRID],
)
def test_matches_torch(kwargs: dict[str, Any], dtype: torch.dtype, foreach: bool) -> None:
    err = run_parity(torch.optim.NAdam, nadam(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


def test_float64_default_dtype_keeps_mu_product_in_float64() -> None:
    # torch keeps mu_product in float64 when the default dtype is float64; so does nadam.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kw = dict(lr=1e-2, momentum_decay=0.1)
        tx = nadam(**kw)
        assert tx.init({"w": torch.zeros(1)})[0].mu_product.dtype == torch.float64
        assert run_parity(torch.optim.NAdam, tx, kw, torch.float64, False) <= 1e-12
    finally:
        torch.set_default_dtype(old)


def test_none_gradient_leaf_tensor_lr_and_reload() -> None:
    kw = dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    tx = nadam(torch.tensor(1e-2, dtype=torch.float64), weight_decay=0.1,
               decoupled_weight_decay=True)
    assert run_parity(torch.optim.NAdam, tx, kw, torch.float64, False, none_leaf=True,
                      reload_at=40) <= 1e-12
    check_mid_run_reload(lambda: nadam(1e-2), torch.float32)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)),
                                    dict(betas=(0.9, 1.0)), dict(weight_decay=-1.0),
                                    dict(momentum_decay=-1.0)], ids=str)
def test_invalid_arguments_raise_like_torch(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        torch.optim.NAdam([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"nadam: invalid.*{next(iter(kwargs))}"):
        nadam(**kwargs)


def test_laws() -> None:
    check_transformation(scale_by_nadam(momentum_decay=0.1), vmap=True, max_examples=15)
    check_transformation(nadam(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
                         max_examples=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]], ids=str)
def test_update_and_apply_is_torch_bit_for_bit(kwargs: dict[str, Any], dtype: torch.dtype
                                               ) -> None:
    """update_and_apply_ runs torch.optim.NAdam(foreach=True): equal bit for bit."""
    check_binding(torch.optim.NAdam, nadam(**kwargs), kwargs, dtype, {"foreach": True}, none_leaf=True)


def test_update_and_apply_after_a_step_without_gradients_follows_the_pure_update() -> None:
    # A step where every gradient is None takes the generic path (the binding needs rows),
    # which advances count and mu_product as the pure update does.
    tx = nadam(1e-2)
    live = {"w": torch.ones(3, 2)}
    pure = {"w": torch.ones(3, 2)}
    s_live, s_pure = tx.init(live), tx.init(pure)
    for g in [None, torch.full((3, 2), 0.5), torch.full((3, 2), -1.0)]:
        s_live = gc.update_and_apply_(tx, {"w": g}, s_live, live)
        u, s_pure = tx.update({"w": g}, s_pure, pure)
        pure = gc.apply_updates(pure, u)
    torch.testing.assert_close(live["w"], pure["w"], rtol=1e-6, atol=0)
    assert torch.equal(s_live[0].mu_product, s_pure[0].mu_product)
