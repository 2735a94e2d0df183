"""gradchain.adagrad against torch.optim.Adagrad: parity over 100 steps for every option,
None gradients, state as data, argument validation and the testing kit's laws."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_parity import DTYPES, RTOL, check_binding, check_mid_run_reload, run_parity

import gradchain as gc
from gradchain.optim.adagrad import adagrad, scale_by_adagrad
from gradchain.testing import check_transformation

CASES = [
    dict(lr=0.1),
    dict(lr=0.1, lr_decay=0.05),
    dict(lr=0.1, initial_accumulator_value=0.5),
    dict(lr=0.1, eps=1e-3),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.1, maximize=True),
    dict(lr=0.05, lr_decay=0.01, weight_decay=0.2, initial_accumulator_value=0.1, maximize=True),
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
    err = run_parity(torch.optim.Adagrad, adagrad(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


def test_fused_torch_and_defaults_match() -> None:
    assert run_parity(torch.optim.Adagrad, adagrad(), {}, torch.float64, None) <= 1e-12
    kw = dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, maximize=True)
    err = run_parity(lambda p, **k: torch.optim.Adagrad(p, fused=True, **k), adagrad(**kw), kw,
                     torch.float32, None)
    assert err <= 1e-5


def decay(t: Any) -> Any:
    return 1.0 / (1.0 + 0.05 * t)


def schedule(count: torch.Tensor) -> torch.Tensor:
    """0.1 * decay(count) in float64: the same numbers LambdaLR gives torch."""
    return 0.1 * decay(count.to(torch.float64))


def test_none_gradient_leaf_and_schedule() -> None:
    kw = dict(lr=0.1, lr_decay=0.02, weight_decay=0.1)
    err = run_parity(
        torch.optim.Adagrad, adagrad(schedule, 0.02, 0.1), kw, torch.float64, False,
        none_leaf=True, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, decay),
    )
    assert err <= 1e-12


def test_tensor_lr() -> None:
    kw = dict(lr=0.1, lr_decay=0.02)
    tx = adagrad(torch.tensor(0.1, dtype=torch.float64), 0.02)
    assert run_parity(torch.optim.Adagrad, tx, kw, torch.float64, False) <= 1e-12


def test_state_round_trip_mid_run() -> None:
    check_mid_run_reload(lambda: adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1),
                         torch.float32)
    kw = dict(lr=0.1, lr_decay=0.01)
    assert run_parity(torch.optim.Adagrad, adagrad(**kw), kw, torch.float64, False,
                      reload_at=50) <= 1e-12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr_decay=-0.1), "lr_decay"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_invalid_arguments_raise_like_torch(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError):
        torch.optim.Adagrad([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"adagrad.*{match}"):
        adagrad(**kwargs)


def test_laws() -> None:
    check_transformation(scale_by_adagrad(lr_decay=0.1, initial_accumulator_value=0.1),
                         vmap=True, compile=True, compile_examples=2, max_examples=15)
    check_transformation(adagrad(0.1, weight_decay=0.1, maximize=True), max_examples=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]], ids=str)
def test_update_and_apply_is_torch_fused_bit_for_bit(kwargs: dict[str, Any], dtype: torch.dtype
                                                     ) -> None:
    check_binding(torch.optim.Adagrad, adagrad(**kwargs), kwargs, dtype, {"fused": True},
                  none_leaf=True)


def test_update_and_apply_with_schedule_and_gate() -> None:
    kw = dict(lr=0.1, lr_decay=0.02)
    check_binding(torch.optim.Adagrad, adagrad(schedule, 0.02), kw, torch.float32,
                  {"fused": True}, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, decay))
    # A nonfinite gradient closes skip_if_nonfinite's gate: params and state stay as they were.
    tx = gc.chain(gc.skip_if_nonfinite(), adagrad(0.1))
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    state = gc.update_and_apply_(tx, {"w": torch.ones(3)}, state, params)
    before = params["w"].clone()
    sums = state[1][0].sum_of_squares["w"].clone()
    state = gc.update_and_apply_(tx, {"w": torch.tensor([1.0, float("nan"), 1.0])}, state, params)
    assert torch.equal(params["w"], before)
    assert torch.equal(state[1][0].sum_of_squares["w"], sums)
    assert int(state[1][0].count) == 1
