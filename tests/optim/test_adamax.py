"""gradchain.adamax against torch.optim.Adamax (parity for every option over 100 steps,
None gradients, state round trip, validation, laws)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _optim_parity import DTYPES, RTOL, check_binding, check_mid_run_reload, run_parity

from gradchain.optim.adamax import adamax, scale_by_adamax
from gradchain.testing import check_transformation

CASES = [
    dict(),
    dict(lr=1e-2, betas=(0.8, 0.99)),
    dict(lr=1e-2, eps=1e-3),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, maximize=True),
    dict(lr=2e-2, betas=(0.5, 0.9), weight_decay=0.2, maximize=True),
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
    err = run_parity(torch.optim.Adamax, adamax(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


def test_none_gradient_leaf_tensor_lr_and_reload() -> None:
    kw = dict(lr=1e-2, weight_decay=0.1)
    tx = adamax(torch.tensor(1e-2, dtype=torch.float64), weight_decay=0.1)
    assert run_parity(torch.optim.Adamax, tx, kw, torch.float64, False, none_leaf=True,
                      reload_at=40) <= 1e-12
    check_mid_run_reload(lambda: adamax(1e-2), torch.float32)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)),
                                    dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0)], ids=str)
def test_invalid_arguments_raise_like_torch(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        torch.optim.Adamax([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"adamax: invalid.*{next(iter(kwargs))}"):
        adamax(**kwargs)


def test_laws() -> None:
    check_transformation(scale_by_adamax(), vmap=True, max_examples=15)
    check_transformation(adamax(weight_decay=0.1, maximize=True), max_examples=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]], ids=str)
def test_update_and_apply_is_torch_bit_for_bit(kwargs: dict[str, Any], dtype: torch.dtype
                                               ) -> None:
    """update_and_apply_ runs torch.optim.Adamax(foreach=True): equal bit for bit."""
    check_binding(torch.optim.Adamax, adamax(**kwargs), kwargs, dtype, {"foreach": True}, none_leaf=True)
