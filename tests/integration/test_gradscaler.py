"""ChainedOptimizer(SGD, chain(loss_scale, clip_by_norm)) against the textbook
torch.amp.GradScaler loop, with non-finite steps injected on both sides."""

from __future__ import annotations

import math

import pytest
import torch

import gradchain as gc

STEPS = 24
INIT_SCALE = 2.0**10
GROWTH_INTERVAL = 3
INF_LOSS = {0, 5, 6, 13}  # the loss is multiplied by inf: every gradient inf/nan
NAN_GRAD = {9, 17}  # one gradient entry set to nan after backward


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(
        dtype
    )


def data(i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(16, 5, generator=gen, dtype=dtype)
    return x, 3 * torch.randn(16, 2, generator=gen, dtype=dtype)


def loss_at(model: torch.nn.Module, i: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = data(i, dtype)
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss * math.inf if i in INF_LOSS else loss


def poison(model: torch.nn.Module, i: int) -> None:
    if i in NAN_GRAD:
        with torch.no_grad():
            model[0].weight.grad[1, 2] = math.nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_params_and_scale_sequence_as_gradscaler(dtype: torch.dtype) -> None:
    # The textbook GradScaler loop.
    ref = make_model(dtype)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(
        device="cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL
    )
    ref_scales, ref_trackers, ref_stepped = [], [], []
    for i in range(STEPS):
        ref_opt.zero_grad()
        scaler.scale(loss_at(ref, i, dtype)).backward()
        poison(ref, i)
        scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        before = [p.detach().clone() for p in ref.parameters()]
        scaler.step(ref_opt)
        scaler.update()
        ref_stepped.append(any(not torch.equal(b, p) for b, p in zip(before, ref.parameters())))
        ref_scales.append(scaler.get_scale())
        ref_trackers.append(scaler.state_dict()["_growth_tracker"])

    # The same loop with the adapter: the scaling, unscaling, clipping, skipping and
    # scale update live in the chain; the loop only calls backward and step.
    model = make_model(dtype)
    opt = gc.ChainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        gc.chain(
            gc.loss_scale(init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL),
            gc.clip_by_norm(1.0),
        ),
    )
    scales, trackers, stepped = [], [], []
    for i in range(STEPS):
        opt.zero_grad()
        opt.backward(loss_at(model, i, dtype))
        poison(model, i)
        opt.step()
        stepped.append(opt.last_step_applied)
        scales.append(gc.tree_get(opt.tx_state, "scale").item())
        trackers.append(int(gc.tree_get(opt.tx_state, "growth_tracker")))

    assert stepped == ref_stepped
    assert stepped == [i not in INF_LOSS | NAN_GRAD for i in range(STEPS)]
    assert scales == ref_scales
    assert trackers == ref_trackers
    pairs = list(zip(scales, scales[1:]))
    assert any(b > a for a, b in pairs) and any(b < a for a, b in pairs)  # grew, backed off
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, r, **tol)
    # Momentum buffers too: skipped steps left them alone on both sides.
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], **tol
        )
