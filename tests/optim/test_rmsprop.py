"""gradchain.rmsprop against torch.optim.RMSprop (parity for every option over 100 steps,
None gradients, state round trip, validation, laws incl. compile)."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
from _optim_parity import DTYPES, RTOL, check_binding, check_mid_run_reload, run_parity

import gradchain as gc
from gradchain.optim.rmsprop import rmsprop, scale_by_rmsprop
from gradchain.testing import check_transformation

CASES = [
    dict(),
    dict(lr=1e-2, alpha=0.9, eps=1e-6),
    dict(lr=1e-2, centered=True),
    dict(lr=1e-2, momentum=0.9),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, maximize=True),
    dict(lr=1e-2, centered=True, momentum=0.5),
    dict(lr=5e-3, alpha=0.95, centered=True, momentum=0.8, weight_decay=0.1, maximize=True),
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
    err = run_parity(torch.optim.RMSprop, rmsprop(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


def test_none_gradient_leaf_tensor_lr_and_reload() -> None:
    kw = dict(lr=1e-2, momentum=0.9, centered=True)
    tx = rmsprop(torch.tensor(1e-2, dtype=torch.float64), momentum=0.9, centered=True)
    assert run_parity(torch.optim.RMSprop, tx, kw, torch.float64, False, none_leaf=True,
                      reload_at=40) <= 1e-12
    check_mid_run_reload(lambda: rmsprop(1e-2, momentum=0.9, centered=True), torch.float32)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1.0), dict(momentum=-0.1),
                                    dict(weight_decay=-1.0), dict(alpha=-0.1)], ids=str)
def test_invalid_arguments_raise_like_torch(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        torch.optim.RMSprop([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"rmsprop: invalid.*{next(iter(kwargs))}"):
        rmsprop(**kwargs)


def test_laws() -> None:
    check_transformation(scale_by_rmsprop(centered=True), vmap=True, compile=True,
                         compile_examples=2, compile_backend="aot_eager", max_examples=15)
    check_transformation(rmsprop(momentum=0.9, weight_decay=0.1, maximize=True),
                         max_examples=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]], ids=str)
def test_update_and_apply_is_torch_bit_for_bit(kwargs: dict[str, Any], dtype: torch.dtype
                                               ) -> None:
    """update_and_apply_ runs torch.optim.RMSprop(foreach=True): equal bit for bit."""
    check_binding(torch.optim.RMSprop, rmsprop(**kwargs), kwargs, dtype, {"foreach": True}, none_leaf=True)



def test_update_and_apply_behind_a_closed_gate_changes_nothing() -> None:
    # torch's foreach RMSprop has no found_inf: the gate's CPU flag is read for free and a
    # closed step leaves params and the rule's state (moments, momentum, counts) untouched.
    tx = gc.chain(gc.skip_if_nonfinite(), rmsprop(1e-2, momentum=0.9, centered=True))
    params = {"w": torch.ones(3), "b": torch.ones(2)}
    state = tx.init(params)
    state = gc.update_and_apply_(tx, {"w": torch.ones(3), "b": torch.ones(2)}, state, params)
    before = [x.clone() for x in optree.tree_leaves((params, state[1]))]
    bad = {"w": torch.tensor([1.0, float("inf"), 1.0]), "b": torch.ones(2)}
    state = gc.update_and_apply_(tx, bad, state, params)
    after = optree.tree_leaves((params, state[1]))
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not bool(gc.applied(state))
