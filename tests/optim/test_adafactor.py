"""gradchain.adafactor against torch.optim.Adafactor (parity for every option over 100
steps, None gradients, schedules, state round trip, validation, laws)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_parity import DTYPES, RTOL, check_binding, check_mid_run_reload, run_parity

from gradchain.optim.adafactor import adafactor, scale_by_adafactor
from gradchain.testing import check_transformation

CASES = [
    dict(),
    dict(lr=0.5),  # lr above 1/sqrt(t): the relative step min(lr, 1/sqrt(t)) switches
    dict(lr=1e-2, beta2_decay=-0.5),
    dict(lr=1e-2, eps=(1e-30, 1e-2)),
    dict(lr=1e-2, d=2.0),
    dict(lr=5e-2, weight_decay=0.1),
    dict(lr=1e-2, maximize=True),
    dict(lr=0.2, beta2_decay=-0.6, eps=(1e-6, 1e-4), d=1.5, weight_decay=0.2, maximize=True),
]
# a 3-D leaf (factored over its last two dims), matrices, a vector and a scalar
SHAPES = {"w": (7, 5), "c": (2, 3, 4), "b": (5,), "s": ()}


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
    err = run_parity(torch.optim.Adafactor, adafactor(**kwargs), kwargs, dtype, foreach,
                     shapes=SHAPES)
    assert err <= RTOL[dtype]


def test_schedule_none_gradient_leaf_and_reload() -> None:
    def decay(t: Any) -> Any:
        return 1.0 / (1.0 + 0.05 * t)

    kw = dict(lr=0.3, weight_decay=0.1)
    tx = adafactor(lambda count: 0.3 * decay(count.to(torch.float64)), weight_decay=0.1)
    err = run_parity(torch.optim.Adafactor, tx, kw, torch.float64, False, shapes=SHAPES,
                     none_leaf=True, reload_at=40,
                     scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, decay))
    assert err <= 1e-12
    check_mid_run_reload(lambda: adafactor(0.1, weight_decay=0.1), torch.float32, shapes=SHAPES)


def test_params_are_required() -> None:
    tx = adafactor()
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="scale_by_adafactor: params is None"):
        tx.update({"w": torch.ones(2)}, tx.init(params))


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(beta2_decay=0.1), dict(eps=(-1.0, 1e-3)),
                                    dict(eps=(None, -1.0)), dict(d=0.5),
                                    dict(weight_decay=-1.0)], ids=str)
def test_invalid_arguments_raise_like_torch(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        torch.optim.Adafactor([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"adafactor: invalid.*{next(iter(kwargs))}"):
        adafactor(**kwargs)


def test_laws() -> None:
    check_transformation(scale_by_adafactor(0.1, weight_decay=0.1), vmap=True, max_examples=15)
    check_transformation(adafactor(maximize=True), max_examples=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]], ids=str)
def test_update_and_apply_is_torch_bit_for_bit(kwargs: dict[str, Any], dtype: torch.dtype
                                               ) -> None:
    """update_and_apply_ runs torch.optim.Adafactor(foreach=True): equal bit for bit."""
    check_binding(torch.optim.Adafactor, adafactor(**kwargs), kwargs, dtype, {"foreach": True}, none_leaf=True, shapes=SHAPES)
