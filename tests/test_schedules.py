"""Tests for gradchain.schedules: closed forms, torch.optim.lr_scheduler equivalents,
int and tensor counts, torch.compile and vmap."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradchain as gc

COUNTS = list(range(0, 40))


def _torch_lrs(make: Callable[[torch.optim.Optimizer], Any], base: float, n: int) -> list[float]:
    """The lr torch uses for the update at epoch 0, 1, ..., n-1."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _check(sched: gc.Schedule, expected: Callable[[int], float], counts=COUNTS) -> None:
    for t in counts:
        want = expected(t)
        got = sched(t)
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), t
        got_t = sched(torch.tensor(t))
        assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float32
        assert got_t.shape == ()
        assert got_t.item() == pytest.approx(want, rel=1e-6, abs=1e-12), t


# --------------------------------------------------------------------------- closed forms
def test_constant():
    _check(gc.constant_schedule(0.3), lambda t: 0.3)


@pytest.mark.parametrize("begin", [0, 5])
def test_linear(begin):
    init, end, steps = 0.5, 0.1, 20

    def expected(t: int) -> float:
        s = min(max(t - begin, 0), steps)
        return init + (end - init) * s / steps

    _check(gc.linear_schedule(init, end, steps, transition_begin=begin), expected)


def test_linear_zero_steps_is_constant():
    _check(gc.linear_schedule(0.5, 0.1, 0), lambda t: 0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_cosine_decay(alpha):
    init, steps = 0.4, 25

    def expected(t: int) -> float:
        s = min(t, steps)
        return init * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * s / steps)) + alpha)

    _check(gc.cosine_decay_schedule(init, steps, alpha), expected)


@pytest.mark.parametrize("staircase", [False, True])
@pytest.mark.parametrize("rate,end", [(0.9, None), (0.9, 0.1), (1.1, 0.5), (1.1, None)])
def test_exponential_decay(staircase, rate, end):
    init, k = 0.3, 3

    def expected(t: int) -> float:
        p = t // k if staircase else t / k
        v = init * rate**p
        if end is not None:
            v = max(v, end) if rate < 1 else min(v, end)
        return v

    _check(gc.exponential_decay(init, rate, k, staircase=staircase, end_value=end), expected)


def test_step_decay():
    _check(gc.step_decay(0.2, 7, 0.5), lambda t: 0.2 * 0.5 ** (t // 7))


@pytest.mark.parametrize("warmup", [0, 5])
def test_warmup_cosine_decay(warmup):
    init, peak, total, end = 0.01, 0.5, 30, 0.05

    def expected(t: int) -> float:
        if t < warmup:
            return init + (peak - init) * t / warmup
        s = min(t - warmup, total - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * s / (total - warmup)))

    _check(gc.warmup_cosine_decay_schedule(init, peak, warmup, total, end), expected)


def test_warmup_cosine_with_zero_peak():
    sched = gc.warmup_cosine_decay_schedule(0.0, 0.0, 2, 10, end_value=0.0)
    assert all(sched(t) == 0.0 for t in range(12))


def test_join_schedules_shifts_the_count():
    seen: list[int] = []

    def recorder(count):
        if isinstance(count, torch.Tensor):
            return torch.full_like(count, 7.0, dtype=torch.float32)
        seen.append(count)
        return 7.0

    sched = gc.join_schedules(
        [gc.constant_schedule(1.0), gc.linear_schedule(2.0, 0.0, 4), recorder], [3, 10]
    )
    assert [sched(t) for t in range(3)] == [1.0, 1.0, 1.0]
    assert [sched(t) for t in range(3, 10)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert sched(10) == 7.0 and sched(12) == 7.0
    assert seen == [0, 2]  # called with count - boundary
    values = sched(torch.arange(14))
    expected = torch.tensor([sched(t) for t in range(14)], dtype=torch.float32)
    assert torch.equal(values, expected)


# --------------------------------------------------------------------------- torch schedulers
N = 60


def _compare(ours: gc.Schedule, theirs: list[float], rel: float = 1e-9) -> None:
    for t, want in enumerate(theirs):
        assert ours(t) == pytest.approx(want, rel=rel, abs=1e-14), t
        assert ours(torch.tensor(t)).item() == pytest.approx(want, rel=1e-6, abs=1e-12), t


def test_matches_step_lr():
    lrs = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.3), 0.1, N)
    _compare(gc.step_decay(0.1, 7, 0.3), lrs)


def test_matches_exponential_lr():
    lrs = _torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95), 0.1, N)
    _compare(gc.exponential_decay(0.1, 0.95), lrs)


@pytest.mark.parametrize("eta_min", [0.0, 0.01])
def test_matches_cosine_annealing_lr(eta_min):
    base, t_max = 0.1, N

    def make(o):
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=t_max, eta_min=eta_min)

    lrs = _torch_lrs(make, base, t_max + 1)
    # torch's recursive form accumulates rounding; compare relative to the base lr.
    ours = gc.cosine_decay_schedule(base, t_max, alpha=eta_min / base)
    for t, want in enumerate(lrs):
        assert abs(ours(t) - want) <= 1e-12 * base, t
        assert abs(ours(torch.tensor(t)).item() - want) <= 1e-7 * base, t


def test_matches_linear_lr():
    base, start, end, total = 0.1, 0.25, 1.0, 12

    def make(o):
        return torch.optim.lr_scheduler.LinearLR(
            o, start_factor=start, end_factor=end, total_iters=total
        )

    lrs = _torch_lrs(make, base, N)
    _compare(gc.linear_schedule(base * start, base * end, total), lrs)


# --------------------------------------------------------------------------- tensors, compile, vmap
ALL = {
    "constant": lambda: gc.constant_schedule(0.1),
    "linear": lambda: gc.linear_schedule(0.1, 0.01, 10, 3),
    "cosine": lambda: gc.cosine_decay_schedule(0.1, 10, 0.1),
    "exponential": lambda: gc.exponential_decay(0.1, 0.8, 2, staircase=True, end_value=0.02),
    "step": lambda: gc.step_decay(0.1, 3),
    "warmup_cosine": lambda: gc.warmup_cosine_decay_schedule(0.0, 0.1, 3, 12, 0.01),
    "join": lambda: gc.join_schedules(
        [gc.constant_schedule(0.1), gc.cosine_decay_schedule(0.1, 5)], [4]
    ),
}


@pytest.mark.parametrize("name", list(ALL))
def test_batched_counts_and_vmap(name):
    sched = ALL[name]()
    counts = torch.arange(20)
    expected = torch.tensor([sched(int(t)) for t in counts], dtype=torch.float32)
    assert torch.equal(sched(counts), expected)
    assert torch.equal(torch.func.vmap(sched)(counts), expected)


@pytest.mark.parametrize("name", ["linear", "exponential", "warmup_cosine", "join"])
def test_compiles_fullgraph(name):
    torch._dynamo.reset()
    sched = ALL[name]()
    compiled = torch.compile(sched, fullgraph=True)
    for t in (0, 2, 5, 13):
        count = torch.tensor(t, dtype=torch.int64)
        torch.testing.assert_close(compiled(count), sched(count), rtol=1e-6, atol=0.0)


@given(
    init=st.floats(1e-6, 10.0),
    end=st.floats(0.0, 10.0),
    steps=st.integers(1, 1000),
    begin=st.integers(0, 100),
    t=st.integers(0, 2000),
)
def test_linear_int_and_tensor_agree(init, end, steps, begin, t):
    sched = gc.linear_schedule(init, end, steps, begin)
    value = sched(t)
    assert min(init, end) - 1e-12 <= value <= max(init, end) + 1e-12
    assert sched(torch.tensor(t)).item() == pytest.approx(value, rel=1e-6, abs=1e-30)


@given(init=st.floats(1e-6, 10.0), steps=st.integers(1, 1000), t=st.integers(0, 2000))
def test_cosine_is_monotone_and_int_tensor_agree(init, steps, t):
    sched = gc.cosine_decay_schedule(init, steps)
    assert sched(t + 1) <= sched(t) + 1e-15
    assert sched(torch.tensor(t)).item() == pytest.approx(sched(t), rel=1e-6, abs=1e-12)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "factory,kwargs,exc,match",
    [
        (gc.linear_schedule, dict(init_value=1.0, end_value=0.0, transition_steps=-1), ValueError, "transition_steps"),
        (gc.linear_schedule, dict(init_value=1.0, end_value=0.0, transition_steps=2.5), TypeError, "transition_steps"),
        (gc.linear_schedule, dict(init_value=1.0, end_value=0.0, transition_steps=3, transition_begin=-1), ValueError, "transition_begin"),
        (gc.cosine_decay_schedule, dict(init_value=1.0, decay_steps=0), ValueError, "decay_steps"),
        (gc.exponential_decay, dict(init_value=1.0, decay_rate=0.0), ValueError, "decay_rate"),
        (gc.exponential_decay, dict(init_value=1.0, decay_rate=0.5, transition_steps=0), ValueError, "transition_steps"),
        (gc.step_decay, dict(init_value=1.0, step_size=0), ValueError, "step_size"),
        (gc.warmup_cosine_decay_schedule, dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=5), ValueError, "decay_steps"),
        (gc.constant_schedule, dict(value=float("nan")), ValueError, "value"),
        (gc.constant_schedule, dict(value="x"), TypeError, "value"),
        (gc.join_schedules, dict(schedules=[gc.constant_schedule(1.0)], boundaries=[3]), ValueError, "boundaries"),
        (gc.join_schedules, dict(schedules=[gc.constant_schedule(1.0)] * 3, boundaries=[5, 3]), ValueError, "non-decreasing"),
        (gc.join_schedules, dict(schedules=[gc.constant_schedule(1.0), 0.1], boundaries=[3]), TypeError, "callable"),
    ],
)  # fmt: skip
def test_invalid_arguments(factory, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        factory(**kwargs)


def test_bad_count_type():
    with pytest.raises(TypeError, match="count"):
        gc.constant_schedule(1.0)(1.5)  # type: ignore[arg-type]
