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

    _check(gc.exponential_decay(init, k, rate, staircase=staircase, end_value=end), expected)


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
    _compare(gc.exponential_decay(0.1, 1, 0.95), lrs)


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
    "exponential": lambda: gc.exponential_decay(0.1, 2, 0.8, staircase=True, end_value=0.02),
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
        (gc.exponential_decay, dict(init_value=1.0, transition_steps=1, decay_rate=0.0), ValueError, "decay_rate"),
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


# --------------------------------------------------------------------------- against optax
# Every schedule against optax's own (jax_enable_x64: float64) over its whole range, past
# its end and at its boundaries: the int path (double precision) to a few ulps, the tensor
# path (float32) to one float32 ulp of optax's float64 value. ``schedule_parity`` gives
# the figures per case (the migration page lists them).
from gradchain import schedules as gs  # noqa: E402

PARITY_CASES: list[tuple[str, str, tuple, dict, int]] = [
    # (id, name, args, kwargs, counts up to)
    ("constant", "constant_schedule", (0.3,), {}, 5),
    ("poly_p2", "polynomial_schedule", (1.0, 0.01, 2.0, 100), {}, 130),
    ("poly_sqrt_begin", "polynomial_schedule", (0.5, 0.1, 0.5, 30), dict(transition_begin=10), 60),
    ("poly_rising", "polynomial_schedule", (0.0, 1.0, 3.0, 7), {}, 12),
    ("poly_zero_steps", "polynomial_schedule", (0.7, 0.1, 2.0, 0), {}, 5),
    ("linear", "linear_schedule", (0.5, 0.1, 20), dict(transition_begin=5), 40),
    ("linear_one_step", "linear_schedule", (1.0, 0.0, 1), {}, 4),
    ("piecewise_constant", "piecewise_constant_schedule", (1.0, {100: 0.1, 200: 0.01}), {}, 260),
    ("piecewise_constant_at_0", "piecewise_constant_schedule", (0.5, {0: 2.0, 3: 0.5, 9: 0.0}), {}, 14),
    ("piecewise_constant_none", "piecewise_constant_schedule", (0.5, None), {}, 4),
    ("interp_linear", "piecewise_interpolate_schedule", ("linear", 1.0, {4: 0.1, 8: 0.01}), {}, 14),
    ("interp_cosine", "piecewise_interpolate_schedule", ("cosine", 1.0, {4: 0.1, 8: 0.01}), {}, 14),
    ("interp_adjacent", "piecewise_interpolate_schedule", ("linear", 0.5, {0: 2.0, 5: 0.5, 6: 3.0}), {}, 10),
    ("interp_none", "piecewise_interpolate_schedule", ("cosine", 0.5, None), {}, 4),
    ("exp_issue_example", "exponential_decay", (1.0, 4, 2.0), {}, 12),
    ("exp_smooth", "exponential_decay", (0.3, 3, 0.9), {}, 40),
    ("exp_staircase_end", "exponential_decay", (0.3, 3, 0.9), dict(staircase=True, end_value=0.1), 60),
    ("exp_begin_growth_end", "exponential_decay", (0.3, 3, 1.1), dict(transition_begin=5, end_value=0.5), 40),
    ("exp_begin_staircase", "exponential_decay", (1.0, 2, 0.5), dict(transition_begin=10, staircase=True), 30),
    ("cosine", "cosine_decay_schedule", (0.4, 25), {}, 40),
    ("cosine_alpha_exponent", "cosine_decay_schedule", (0.4, 25, 0.2, 2.0), {}, 40),
    ("cosine_one_step_sqrt", "cosine_decay_schedule", (1.0, 1, 0.0, 0.5), {}, 4),
    ("cosine_alpha_above_1", "cosine_decay_schedule", (1.0, 10, 1.5), {}, 14),
    ("warmup_constant", "warmup_constant_schedule", (0.0, 1.0, 10), {}, 15),
    ("warmup_constant_none", "warmup_constant_schedule", (0.5, 0.1, 0), {}, 4),
    ("warmup_cosine", "warmup_cosine_decay_schedule", (0.01, 0.5, 5, 30, 0.05), {}, 40),
    ("warmup_cosine_no_warmup", "warmup_cosine_decay_schedule", (0.0, 0.5, 0, 30), {}, 35),
    ("warmup_cosine_exponent", "warmup_cosine_decay_schedule", (0.0, 1.0, 2, 6, 0.0, 3.0), {}, 10),
    ("warmup_cosine_zero_peak", "warmup_cosine_decay_schedule", (0.0, 0.0, 2, 10), {}, 12),
    ("warmup_exp", "warmup_exponential_decay_schedule", (0.0, 1.0, 2, 1, 0.5), {}, 12),
    ("warmup_exp_all", "warmup_exponential_decay_schedule", (0.1, 1.0, 5, 3, 0.8),
     dict(transition_begin=4, staircase=True, end_value=0.2), 60),
    ("warmup_exp_no_warmup", "warmup_exponential_decay_schedule", (0.1, 1.0, 0, 3, 0.8), {}, 12),
    ("sgdr", "sgdr_schedule", ([
        dict(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=10),
        dict(init_value=0.5, peak_value=0.5, warmup_steps=0, decay_steps=7, end_value=0.1, exponent=2.0),
        dict(init_value=0.1, peak_value=0.3, warmup_steps=3, decay_steps=5, end_value=0.01),
    ],), {}, 30),
    ("linear_onecycle", "linear_onecycle_schedule", (100, 1.0), {}, 120),
    ("linear_onecycle_args", "linear_onecycle_schedule", (10, 1.0, 0.2, 0.6, 10.0, 10.0), {}, 14),
    ("linear_onecycle_one_step", "linear_onecycle_schedule", (1, 0.5), {}, 4),
    ("linear_onecycle_equal_pcts", "linear_onecycle_schedule", (3, 1.0, 0.5, 0.5), {}, 6),
    ("linear_onecycle_extremes", "linear_onecycle_schedule", (7, 2.0, 0.0, 1.0), {}, 10),
    ("cosine_onecycle", "cosine_onecycle_schedule", (100, 1.0), {}, 120),
    ("cosine_onecycle_args", "cosine_onecycle_schedule", (10, 1.0, 0.2, 10.0), {}, 14),
    ("cosine_onecycle_one_step", "cosine_onecycle_schedule", (1, 0.5), {}, 4),
    ("cosine_onecycle_all_rise", "cosine_onecycle_schedule", (5, 1.0, 1.0), {}, 8),
]  # fmt: skip


_LONGEST = max(c[4] for c in PARITY_CASES)


@pytest.fixture(scope="module")
def optax_x64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax, optax
    jax.config.update("jax_enable_x64", before)


def _optax_values(jax, optax, name, args, kwargs, counts):
    import numpy as np

    sched = getattr(optax, name)(*args, **kwargs)
    out = jax.vmap(lambda c: jax.numpy.asarray(sched(c), dtype=jax.numpy.float64))(
        jax.numpy.asarray(counts, dtype=jax.numpy.int64)
    )
    return np.asarray(out, dtype=np.float64)


def schedule_parity(jax, optax, name, args, kwargs, upto):
    """(max relative error of the int path, max float32 ulps of the tensor path) against
    optax over counts ``0 .. upto`` plus two far counts."""
    # One length for every case: jax compiles each op once per shape, and the cases share
    # them. (Not jit: XLA's fused pow is less accurate than its op-by-op one, ~1e-8.)
    counts = list(range(max(upto, _LONGEST) + 1)) + [10_000, 1_000_000]
    want = _optax_values(jax, optax, name, args, kwargs, counts)
    ours = getattr(gs, name)(*args, **kwargs)
    rel = 0.0
    for t, w in zip(counts, want):
        got = ours(t)
        assert isinstance(got, float)
        rel = max(rel, abs(got - w) / max(abs(w), 1e-300) if got != w else 0.0)
    got_t = ours(torch.tensor(counts, dtype=torch.int64))
    assert got_t.dtype == torch.float32 and got_t.shape == (len(counts),)
    ref32 = torch.tensor(want, dtype=torch.float64).to(torch.float32)
    ulp = torch.finfo(torch.float32).eps * ref32.abs().clamp(min=torch.finfo(torch.float32).tiny)
    diff = torch.where(got_t == ref32, 0.0, (got_t - ref32).abs())  # inf == inf past overflow
    ulps = float((diff / ulp).max())
    return rel, ulps


@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_matches_optax(optax_x64, case):
    jax, optax = optax_x64
    _, name, args, kwargs, upto = case
    rel, ulps = schedule_parity(jax, optax, name, args, kwargs, upto)
    # Measured: at most 4.8e-14 (exponential_decay at count 10_000, a value near 1e-153:
    # torch's and XLA's pow round differently), 1.4e-14 elsewhere; the float32 path equals
    # float32(optax's float64 value) everywhere (0 ulps).
    assert rel <= 1e-13, (name, rel)
    assert ulps <= 1.0, (name, ulps)


def test_exponential_decay_has_optax_positional_order(optax_x64):
    """The issue's example: (1.0, 4, 2) is (init, transition_steps, decay_rate)."""
    jax, optax = optax_x64
    sched = gc.exponential_decay(1.0, 4, 2)
    assert [sched(t) for t in (0, 4, 8)] == [1.0, 2.0, 4.0]
    ref = optax.exponential_decay(1.0, 4, 2)
    assert [float(ref(t)) for t in (0, 4, 8)] == [1.0, 2.0, 4.0]
    # The old order's float decay rate in second place is refused, recalling the order.
    with pytest.raises(TypeError, match="positional order is optax's"):
        gc.exponential_decay(0.1, 0.95, 4)  # type: ignore[arg-type]  # 0.1's (init, rate, steps)


def test_every_optax_schedule_has_a_parity_case():
    names = {c[1] for c in PARITY_CASES}
    optax = pytest.importorskip("optax")
    optax_names = {
        n for n in dir(optax.schedules)
        if not n.startswith("_") and (n.endswith("_schedule") or n == "exponential_decay")
    }
    missing = optax_names - names - {"join_schedules"}
    assert not missing, missing
    assert names <= set(gs.__all__)


def test_join_schedules_matches_optax(optax_x64):
    jax, optax = optax_x64
    import numpy as np

    ours = gc.join_schedules(
        [gc.constant_schedule(1.0), gc.linear_schedule(1.0, 0.0, 4), gc.cosine_decay_schedule(0.5, 5)],
        [3, 10],
    )
    ref = optax.join_schedules(
        [optax.constant_schedule(1.0), optax.linear_schedule(1.0, 0.0, 4),
         optax.cosine_decay_schedule(0.5, 5)],
        [3, 10],
    )
    for t in range(20):
        assert ours(t) == pytest.approx(float(np.asarray(ref(t))), rel=1e-15, abs=1e-300), t


NEW = {
    "polynomial": lambda: gs.polynomial_schedule(0.1, 0.01, 2.0, 10, 3),
    "piecewise_constant": lambda: gs.piecewise_constant_schedule(0.1, {3: 0.5, 7: 0.1}),
    "piecewise_interpolate": lambda: gs.piecewise_interpolate_schedule("cosine", 0.1, {4: 0.1}),
    "cosine_exponent": lambda: gc.cosine_decay_schedule(0.1, 10, 0.1, exponent=2.0),
    "warmup_exponential": lambda: gs.warmup_exponential_decay_schedule(0.0, 0.1, 3, 2, 0.5, 1, True, 0.01),
    "sgdr": lambda: gs.sgdr_schedule([dict(init_value=0.0, peak_value=0.1, warmup_steps=2, decay_steps=6)] * 2),
    "linear_onecycle": lambda: gs.linear_onecycle_schedule(12, 0.1),
    "cosine_onecycle": lambda: gs.cosine_onecycle_schedule(12, 0.1),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NEW))
def test_new_schedules_batch_and_vmap(name):
    sched = NEW[name]()
    counts = torch.arange(20)
    expected = torch.tensor([sched(int(t)) for t in counts], dtype=torch.float32)
    assert torch.equal(sched(counts), expected)
    assert torch.equal(torch.func.vmap(sched)(counts), expected)


@pytest.mark.parametrize("name", ["polynomial", "piecewise_interpolate", "sgdr", "linear_onecycle"])
def test_new_schedules_compile_fullgraph(name):
    torch._dynamo.reset()
    sched = NEW[name]()
    compiled = torch.compile(sched, fullgraph=True)
    for t in (0, 2, 5, 13):
        count = torch.tensor(t, dtype=torch.int64)
        torch.testing.assert_close(compiled(count), sched(count), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "factory,kwargs,exc,match",
    [
        # negative values: optax would give a negative learning rate, silently
        (gc.constant_schedule, dict(value=-0.1), ValueError, "value must be >= 0"),
        (gc.linear_schedule, dict(init_value=-1.0, end_value=0.0, transition_steps=3), ValueError, "init_value must be >= 0"),
        (gs.polynomial_schedule, dict(init_value=1.0, end_value=-0.1, power=2.0, transition_steps=3), ValueError, "end_value must be >= 0"),
        (gc.warmup_cosine_decay_schedule, dict(init_value=0.0, peak_value=-1.0, warmup_steps=2, decay_steps=5), ValueError, "peak_value must be >= 0"),
        (gc.exponential_decay, dict(init_value=-1.0, transition_steps=1, decay_rate=0.5), ValueError, "init_value must be >= 0"),
        (gs.linear_onecycle_schedule, dict(transition_steps=10, peak_value=-1.0), ValueError, "peak_value must be >= 0"),
        (gs.cosine_onecycle_schedule, dict(transition_steps=10, peak_value=-1.0), ValueError, "peak_value must be >= 0"),
        (gs.warmup_exponential_decay_schedule, dict(init_value=0.0, peak_value=-1.0, warmup_steps=2, transition_steps=1, decay_rate=0.5), ValueError, "peak_value must be >= 0"),
        (gc.cosine_decay_schedule, dict(init_value=1.0, decay_steps=4, alpha=-0.5), ValueError, "alpha must be >= 0"),
        (gs.piecewise_constant_schedule, dict(init_value=1.0, boundaries_and_scales={3: -0.5}), ValueError, "boundaries_and_scales"),
        (gc.step_decay, dict(init_value=1.0, step_size=2, gamma=-0.5), ValueError, "gamma must be >= 0"),
        # what optax turns quietly into something else
        (gc.exponential_decay, dict(init_value=1.0, transition_steps=-3, decay_rate=0.5), ValueError, "transition_steps"),
        (gc.exponential_decay, dict(init_value=1.0, transition_steps=2, decay_rate=0.5, transition_begin=-1), ValueError, "transition_begin"),
        (gs.polynomial_schedule, dict(init_value=1.0, end_value=0.0, power=0.0, transition_steps=3), ValueError, "power must be > 0"),
        (gc.cosine_decay_schedule, dict(init_value=1.0, decay_steps=4, exponent=0.0), ValueError, "exponent must be > 0"),
        (gc.warmup_cosine_decay_schedule, dict(init_value=0.0, peak_value=0.0, warmup_steps=2, decay_steps=5, end_value=0.1), ValueError, "end_value must be 0 when peak_value is 0"),
        (gs.piecewise_interpolate_schedule, dict(interpolate_type="cubic", init_value=1.0), ValueError, "interpolate_type"),
        (gs.piecewise_constant_schedule, dict(init_value=1.0, boundaries_and_scales={-1: 0.5}), ValueError, "non-negative"),
        (gs.linear_onecycle_schedule, dict(transition_steps=0, peak_value=1.0), ValueError, "transition_steps"),
        (gs.linear_onecycle_schedule, dict(transition_steps=10, peak_value=1.0, pct_start=0.9, pct_final=0.5), ValueError, "pct_final"),
        (gs.cosine_onecycle_schedule, dict(transition_steps=10, peak_value=1.0, pct_start=1.5), ValueError, "pct_start"),
        (gs.cosine_onecycle_schedule, dict(transition_steps=10, peak_value=1.0, div_factor=0.0), ValueError, "div_factor"),
        (gs.sgdr_schedule, dict(cosine_kwargs=[]), ValueError, "at least one cycle"),
        (gs.sgdr_schedule, dict(cosine_kwargs=[dict(init_value=0.0, peak_value=1.0, warmup_steps=1)]), ValueError, "decay_steps"),
        (gs.sgdr_schedule, dict(cosine_kwargs=[dict(init_value=0.0, peak_value=-1.0, warmup_steps=1, decay_steps=3)]), ValueError, r"cosine_kwargs\[0\].*peak_value"),
        (gc.exponential_decay, dict(init_value=1.0, transition_steps=2.0, decay_rate=0.5), TypeError, "transition_steps must be an int"),
    ],
)  # fmt: skip
def test_invalid_arguments_refused_loudly(factory, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        factory(**kwargs)
