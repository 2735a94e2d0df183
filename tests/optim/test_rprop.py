"""gradchain.rprop against torch.optim.Rprop (parity for every option over 100 steps,
None gradients, state round trip, validation, laws)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_parity import DTYPES, RTOL, check_binding, check_mid_run_reload, run_parity

from gradchain.optim.rprop import rprop, scale_by_rprop
from gradchain.testing import check_transformation

CASES = [
    dict(),
    dict(lr=1e-3, etas=(0.3, 1.5)),
    dict(lr=1e-2, step_sizes=(1e-3, 0.05)),
    dict(lr=1e-2, maximize=True),
    dict(lr=2e-2, etas=(0.4, 1.1), step_sizes=(1e-4, 1.0), maximize=True),
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
    err = run_parity(torch.optim.Rprop, rprop(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


def test_repeated_gradients_grow_and_shrink_steps_like_torch() -> None:
    # Random gradients flip sign half the time; a constant direction exercises etaplus and
    # the clamp at the maximum step size.
    kw = dict(lr=1e-2, step_sizes=(1e-6, 0.2))
    err = run_parity(torch.optim.Rprop, rprop(**kw), kw, torch.float64, False, steps=40,
                     grad_scale=1.0)
    assert err <= 1e-12


def test_none_gradient_leaf_tensor_lr_and_reload() -> None:
    kw = dict(lr=1e-2)
    tx = rprop(torch.tensor(1e-2, dtype=torch.float64))
    assert run_parity(torch.optim.Rprop, tx, kw, torch.float64, False, none_leaf=True,
                      reload_at=40) <= 1e-12
    check_mid_run_reload(lambda: rprop(1e-2), torch.float32)


def test_schedule_is_refused() -> None:
    with pytest.raises(TypeError, match="rprop: lr sets the initial"):
        rprop(lambda count: 0.1)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(etas=(1.0, 1.2)), dict(etas=(0.5, 1.0)),
                                    dict(etas=(0.0, 1.2))], ids=str)
def test_invalid_arguments_raise_like_torch(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        torch.optim.Rprop([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"rprop: invalid.*{next(iter(kwargs))}"):
        rprop(**kwargs)


def test_laws() -> None:
    check_transformation(scale_by_rprop(0.1), vmap=True, max_examples=15)
    check_transformation(rprop(maximize=True), max_examples=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]], ids=str)
def test_update_and_apply_is_torch_bit_for_bit(kwargs: dict[str, Any], dtype: torch.dtype
                                               ) -> None:
    """update_and_apply_ runs torch.optim.Rprop(foreach=True): equal bit for bit."""
    check_binding(torch.optim.Rprop, rprop(**kwargs), kwargs, dtype, {"foreach": True}, none_leaf=True)
