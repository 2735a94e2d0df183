"""Behaviour of the gates: accumulate_every, skip_if_nonfinite, loss_scale (and scale_loss)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _core_helpers import (
    assert_compiled_matches_eager,
    assert_tree_close,
    assert_tree_equal,
    assert_vmap_matches_loop,
    check_protocol,
    clone_tree,
    grad_sequences,
    leaves,
)
from hypothesis import given

import gradchain as gc
from gradchain import gating

NAN, INF = float("nan"), float("inf")


def _roundtrip(state, template):
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    return gc.from_state_dict(template, torch.load(buf, weights_only=True))


def _grads(seed, dtype=torch.float32, bad=None):
    gen = torch.Generator().manual_seed(seed)
    g = {
        "w": torch.randn(3, 2, generator=gen, dtype=dtype),
        "b": torch.randn(2, generator=gen, dtype=dtype),
        "s": torch.randn((), generator=gen, dtype=dtype),
    }
    if bad is not None:
        g["w"][1, 0] = bad
    return g


PARAMS = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "s": torch.zeros(())}


# =========================================================================== accumulate_every
def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    params = {
        "weight": torch.randn(3, 5, generator=gen, dtype=torch.float64),
        "bias": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    return x, y, params


def _mse_grad(params, x, y):
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = torch.nn.functional.mse_loss(x @ p["weight"].T + p["bias"], y)
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def test_accumulate_window_mean_equals_gradient_of_concatenated_batch():
    x, y, params = _linear_problem()
    full = _mse_grad(params, x, y)
    tx = gc.accumulate_every(4)
    state = tx.init(params)
    for i, (xb, yb) in enumerate(zip(x.chunk(4), y.chunk(4))):
        out, state = tx.update(_mse_grad(params, xb, yb), state, params)
        if i < 3:
            assert not bool(gc.applied(state))
            assert all(bool((v == 0).all()) for v in out.values())
            assert int(state.mini_step) == i + 1
        else:
            assert bool(gc.applied(state))
            assert int(state.mini_step) == 0
    for k in full:
        assert out[k].dtype == torch.float64
        torch.testing.assert_close(out[k], full[k], rtol=1e-12, atol=1e-14)
    # The accumulator restarts from zero after the window.
    assert all(bool((s == 0).all()) for s in state.sums.values())


def test_accumulate_mean_false_gives_the_sum_and_n_1_passes_through():
    tx = gc.accumulate_every(3, mean=False)
    gs = [_grads(i, torch.float64) for i in range(3)]
    state = tx.init({k: v.double() for k, v in PARAMS.items()})
    for g in gs:
        out, state = tx.update(g, state)
    for k in out:
        torch.testing.assert_close(out[k], gs[0][k] + gs[1][k] + gs[2][k], rtol=1e-14, atol=0)
    tx = gc.accumulate_every(1)
    state = tx.init(PARAMS)
    for i in range(3):
        g = _grads(i)
        out, state = tx.update(g, state)
        assert bool(gc.applied(state))
        assert_tree_equal(out, g)


@pytest.mark.parametrize("make_tail", [lambda: gc.sgd(0.1, momentum=0.9), lambda: gc.adam(1e-2)])
def test_accumulate_inner_state_advances_once_per_window(make_tail):
    n, windows = 3, 3
    tx = gc.chain(gc.accumulate_every(n), make_tail())
    ref = make_tail()  # fed the window means directly
    state, ref_state = tx.init(PARAMS), ref.init(PARAMS)
    for w in range(windows):
        gs = [_grads(10 * w + i) for i in range(n)]
        for i, g in enumerate(gs):
            inner_before = clone_tree(state[1])
            out, state = tx.update(g, state, PARAMS)
            if i < n - 1:
                assert_tree_equal(state[1], inner_before)  # bit-identical: not run at all
                assert all(bool((v == 0).all()) for v in out.values())
        mean = {k: (gs[0][k] + gs[1][k] + gs[2][k]) / 3 for k in gs[0]}
        ref_out, ref_state = ref.update(mean, ref_state, PARAMS)
        assert_tree_close(out, ref_out, rtol=1e-5, atol=1e-7)
        assert_tree_close(state[1], ref_state, rtol=1e-5, atol=1e-7)
    assert int(leaves(state[1])[0]) == windows  # the tail's count


def test_accumulate_flush_gives_exact_mean_of_partial_window():
    tx = gc.chain(gc.accumulate_every(4), gc.sgd(lr=1.0))
    params = {k: v.double() for k, v in PARAMS.items()}
    state = tx.init(params)
    gs = [_grads(i, torch.float64) for i in range(3)]
    out, state = tx.update(gs[0], state, params)
    out, state = tx.update(gs[1], state, params)
    assert not bool(gc.applied(state))
    out, state = tx.update(gs[2], state, params, flush=True)
    assert bool(gc.applied(state))
    for k in out:
        expected = -(gs[0][k] + gs[1][k] + gs[2][k]) / 3  # exact: not divided by n=4
        torch.testing.assert_close(out[k], expected, rtol=1e-14, atol=0)
    acc = state[0]
    assert int(acc.mini_step) == 0 and int(acc.accumulated) == 0
    assert all(bool((s == 0).all()) for s in acc.sums.values())
    # flush as a host tensor works the same; flush on an empty window is not applied
    tx2 = gc.accumulate_every(4)
    s2 = tx2.init(params)
    out2, s2 = tx2.update(gs[0], s2, flush=torch.tensor(True))
    assert bool(gc.applied(s2))
    assert_tree_equal(out2, gs[0])
    # A new window after the flush counts from zero again.
    for i in range(3):
        out, state = tx.update(gs[i], state, params)
        assert not bool(gc.applied(state))
    out, state = tx.update(gs[0], state, params)
    assert bool(gc.applied(state))


@pytest.mark.parametrize("save_after", [1, 2, 4])
def test_accumulate_resumes_identically_from_a_mid_window_checkpoint(save_after):
    def make():
        return gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(3), gc.adam(1e-2))

    tx = make()
    steps = [_grads(i) for i in range(8)]
    state = tx.init(PARAMS)
    results = []
    for i, g in enumerate(steps):
        if i == save_after:
            saved = _roundtrip(state, tx.init(PARAMS))
        out, state = tx.update(g, state, PARAMS)
        results.append((out, state, bool(gc.applied(state))))
    resumed = saved
    assert int(resumed[1].mini_step) == save_after % 3
    tx2 = make()  # as in a new process
    for i in range(save_after, len(steps)):
        out, resumed = tx2.update(steps[i], resumed, PARAMS)
        assert_tree_equal(out, results[i][0])
        assert_tree_equal(resumed, results[i][1])
        assert bool(gc.applied(resumed)) == results[i][2]


def test_accumulate_behind_skip_excludes_dropped_micro_steps():
    tx = gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(4), gc.sgd(lr=1.0, momentum=0.5))
    params = {k: v.double() for k, v in PARAMS.items()}
    state = tx.init(params)
    gs = [_grads(i, torch.float64) for i in range(4)]
    gs[1]["w"][0, 0] = NAN
    gs[3]["b"][1] = -INF
    for g in gs:
        out, state = tx.update(g, state, params)
    assert bool(gc.applied(state))
    assert int(state[1].accumulated) == 0 and int(state[0].total_skips) == 2
    for k in out:
        torch.testing.assert_close(out[k], -(gs[0][k] + gs[2][k]) / 2, rtol=1e-14, atol=0)
    # A window whose micro-steps were all dropped is not applied and the tail keeps its state.
    tail_before = clone_tree(state[2])
    for i in range(4):
        out, state = tx.update(_grads(i, torch.float64, bad=NAN), state, params)
        assert all(bool((v == 0).all()) for v in out.values())
        assert not bool(gc.applied(state))
    assert_tree_equal(state[2], tail_before)
    assert int(state[0].consecutive_skips) == 5 and int(state[0].total_skips) == 6
    assert int(state[1].mini_step) == 0  # the window still closed on schedule


def test_accumulate_float16_accumulates_in_float32():
    params = {"w": torch.zeros(2, dtype=torch.float16)}
    tx = gc.accumulate_every(4, mean=False)
    state = tx.init(params)
    assert state.sums["w"].dtype == torch.float32
    vals = [2048.0, 1.0, 1.0, 1.0]  # float16 spacing at 2048 is 2: a float16 sum stays 2048
    for i, v in enumerate(vals):
        out, state = tx.update({"w": torch.full((2,), v, dtype=torch.float16)}, state)
        if i == 2:
            assert torch.equal(state.sums["w"], torch.full((2,), 2050.0))
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.full((2,), 2051.0).half())
    assert float(out["w"][0]) == 2052.0  # 2051 rounded once, at the end
    # bfloat16 too; explicit accumulator_dtype wins
    assert (
        gc.accumulate_every(2).init({"w": torch.zeros(1, dtype=torch.bfloat16)}).sums["w"].dtype
        == torch.float32
    )
    st16 = gc.accumulate_every(2, accumulator_dtype=torch.float16).init(params)
    assert st16.sums["w"].dtype == torch.float16
    st64 = gc.accumulate_every(2, accumulator_dtype=torch.float64).init(params)
    assert st64.sums["w"].dtype == torch.float64


def test_accumulate_none_gradient_passes_through_and_keeps_its_sum():
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = gc.accumulate_every(2)
    state = tx.init(params)
    out, state = tx.update({"a": torch.ones(2), "b": torch.full((2,), 4.0)}, state)
    out, state = tx.update({"a": torch.ones(2), "b": None}, state)
    assert out["b"] is None
    assert torch.equal(out["a"], torch.ones(2))
    # b's sum is carried into the next window rather than dropped
    assert torch.equal(state.sums["b"], torch.full((2,), 4.0))
    assert torch.equal(state.sums["a"], torch.zeros(2))


def test_accumulate_micro_step_zeros_take_no_memory_and_donated_close_reuses_the_sums():
    tx = gc.accumulate_every(2)
    params = {"w": torch.zeros(64, 8), "b": torch.zeros(8, dtype=torch.float64)}
    state = tx.init(params)
    out, state = tx.update({"w": torch.ones(64, 8), "b": torch.ones(8, dtype=torch.float64)}, state)
    for k, x in out.items():
        assert x.shape == params[k].shape and x.dtype == params[k].dtype
        assert not bool(x.any())
        assert x.untyped_storage().nbytes() == x.element_size()  # one 0-dim zero, broadcast
    sums = {k: v.data_ptr() for k, v in state.sums.items()}
    grads = {"w": torch.full((64, 8), 3.0), "b": torch.full((8,), 3.0, dtype=torch.float64)}
    out, state = tx.update(grads, state, donate=True)
    assert torch.equal(out["w"], torch.full((64, 8), 2.0)) and bool(gc.applied(state))
    for k, v in state.sums.items():
        assert v.data_ptr() == sums[k]  # the next window starts in the donated sums
        assert not bool(v.any())


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(n=0), ValueError),
        (dict(n=-2), ValueError),
        (dict(n=2.0), TypeError),
        (dict(n=True), TypeError),
        (dict(n="4"), TypeError),
        (dict(n=2, mean=1), TypeError),
        (dict(n=2, accumulator_dtype=torch.int64), TypeError),
        (dict(n=2, accumulator_dtype="float32"), TypeError),
    ],
)
def test_accumulate_validates_arguments(kwargs, exc):
    with pytest.raises(exc, match="accumulate_every"):
        gc.accumulate_every(**kwargs)


# =========================================================================== skip_if_nonfinite
@pytest.mark.parametrize(
    "make_tail",
    [lambda: gc.adam(1e-2), lambda: gc.sgd(0.1, momentum=0.9, nesterov=True)],
)
def test_skip_leaves_downstream_state_bit_identical(make_tail):
    tx = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), make_tail())
    state = tx.init(PARAMS)
    plan = [None, None, NAN, INF, None, -INF, None]
    consecutive, total = [], []
    for i, bad in enumerate(plan):
        before = clone_tree(state)
        out, state = tx.update(_grads(i, bad=bad), state, PARAMS)
        assert all(bool(torch.isfinite(v).all()) for v in out.values())
        if bad is None:
            assert bool(gc.applied(state))
            assert any(bool((v != 0).any()) for v in out.values())
        else:
            assert not bool(gc.applied(state))
            assert all(bool((v == 0).all()) for v in out.values())
            for new, old in zip(leaves(state[1:]), leaves(before[1:])):
                if isinstance(new, torch.Tensor):
                    assert torch.equal(new, old)
        consecutive.append(int(state[0].consecutive_skips))
        total.append(int(state[0].total_skips))
    assert consecutive == [0, 0, 1, 2, 0, 1, 0]
    assert total == [0, 0, 1, 2, 2, 3, 3]
    # The tail counted only the applied steps.
    assert int(leaves(state[2])[0]) == 4


def test_skip_counters_saturate():
    tx = gc.skip_if_nonfinite()
    big = torch.iinfo(torch.int64).max
    state = gc.SkipIfNonfiniteState(torch.tensor(True), torch.tensor(big - 1), torch.tensor(big))
    _, state = tx.update({"w": torch.tensor([NAN])}, state)
    _, state = tx.update({"w": torch.tensor([NAN])}, state)
    assert int(state.consecutive_skips) == big and int(state.total_skips) == big


def test_skip_passes_finite_updates_and_none_unchanged():
    tx = gc.skip_if_nonfinite()
    g = {"a": torch.randn(3), "b": None, "c": torch.zeros(0)}
    out, state = tx.update(g, tx.init({"a": torch.zeros(3), "b": torch.zeros(1), "c": g["c"]}))
    assert out["b"] is None
    assert torch.equal(out["a"], g["a"]) and out["c"].shape == (0,)
    assert bool(state.is_open)


# =========================================================================== loss_scale
def _textbook_gradscaler_run(steps, bad, init_scale, growth_interval, momentum):
    """A real GradScaler loop next to chain(loss_scale, sgd) on the same gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    scaler = torch.amp.GradScaler(
        device="cpu", init_scale=init_scale, growth_interval=growth_interval
    )
    tx = gc.chain(
        gc.loss_scale(init_scale=init_scale, growth_interval=growth_interval),
        gc.sgd(lr=0.05, momentum=momentum),
    )
    state = tx.init(params)
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(steps, 8, 4, generator=gen), torch.randn(steps, 8, 2, generator=gen)
    log = []
    for t in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs[t]), ys[t])
        scaled = scaler.scale(loss)
        assert torch.equal(gc.scale_loss(loss.detach(), state), scaled.detach())
        scaled.backward()
        if t in bad:
            next(model.parameters()).grad[0, 1] = bad[t]
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        ref_before = {k: v.detach().clone() for k, v in model.named_parameters()}
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        ours_before = params
        updates, state = tx.update(grads, state, params)
        params = gc.apply_updates(params, updates)
        ref_after = {k: v.detach() for k, v in model.named_parameters()}
        ref_skipped = all(torch.equal(ref_before[k], ref_after[k]) for k in ref_after)
        our_skipped = all(torch.equal(ours_before[k], params[k]) for k in params)
        log.append(
            dict(
                ref_scale=scaler.get_scale(),
                scale=float(state[0].scale),
                ref_tracker=int(scaler._get_growth_tracker()),
                tracker=int(state[0].growth_tracker),
                ref_skipped=ref_skipped,
                skipped=our_skipped,
                applied=bool(gc.applied(state)),
            )
        )
        for k in params:
            torch.testing.assert_close(params[k], ref_after[k], rtol=1e-5, atol=1e-6)
    return log


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_loss_scale_matches_gradscaler_textbook_loop(momentum):
    bad = {4: INF, 5: NAN, 9: -INF, 17: NAN, 18: NAN, 19: INF, 25: INF}
    log = _textbook_gradscaler_run(30, bad, 2.0**10, 3, momentum)
    scales = [e["scale"] for e in log]
    assert scales == [e["ref_scale"] for e in log]
    assert [e["tracker"] for e in log] == [e["ref_tracker"] for e in log]
    assert [e["skipped"] for e in log] == [e["ref_skipped"] for e in log]
    assert [not e["applied"] for e in log] == [t in bad for t in range(30)]
    assert [e["skipped"] for e in log] == [t in bad for t in range(30)]
    # the sequence saw both growth and backoff
    assert max(scales) > 2.0**10 and min(scales) < 2.0**10
    assert any(b > a for a, b in zip(scales, scales[1:]))


def test_loss_scale_gradscaler_algorithm_small_cases():
    # The reference's verified run: init 4, interval 3, iterations inf, ok, ok, ok, ok, inf, ok
    tx = gc.loss_scale(init_scale=4.0, growth_interval=3)
    state = tx.init(PARAMS)
    scales, trackers = [], []
    for bad in [INF, None, None, None, None, INF, None]:
        _, state = tx.update(_grads(0, bad=bad), state)
        scales.append(float(state.scale))
        trackers.append(int(state.growth_tracker))
    assert scales == [2, 2, 2, 4, 4, 2, 2]
    assert trackers == [0, 1, 2, 0, 1, 0, 1]
    # Three consecutive nan steps from 1.0 give 0.125 (no floor by default).
    tx = gc.loss_scale(init_scale=1.0)
    state = tx.init(PARAMS)
    for _ in range(3):
        _, state = tx.update(_grads(0, bad=NAN), state)
    assert float(state.scale) == 0.125


def test_loss_scale_unscales_and_skips():
    tx = gc.loss_scale(init_scale=8.0)
    state = tx.init(PARAMS)
    g = _grads(3)
    scaled = {k: v * 8.0 for k, v in g.items()}
    out, state = tx.update(scaled, state)
    assert bool(gc.applied(state))
    assert_tree_close(out, g, rtol=0, atol=0)
    out, state = tx.update(
        {k: v.clone() for k, v in scaled.items()} | {"b": torch.tensor([INF, 1.0])}, state
    )
    assert not bool(gc.applied(state))
    assert all(bool((v == 0).all()) for v in out.values())
    # float16 gradients are accepted and unscaled in float32
    tx = gc.loss_scale(init_scale=2.0**16)
    g16 = {"w": torch.full((3,), 60000.0, dtype=torch.float16)}
    out, state = tx.update(g16, tx.init(g16))
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.full((3,), 60000.0 / 2**16).half())


def test_loss_scale_min_scale_floor():
    tx = gc.loss_scale(init_scale=4.0, min_scale=1.0)
    state = tx.init(PARAMS)
    scales = []
    for _ in range(5):
        _, state = tx.update(_grads(0, bad=INF), state)
        scales.append(float(state.scale))
    assert scales == [2.0, 1.0, 1.0, 1.0, 1.0]
    tx = gc.loss_scale(init_scale=4.0, min_scale=3.0)
    _, state = tx.update(_grads(0, bad=INF), tx.init(PARAMS))
    assert float(state.scale) == 3.0


def test_loss_scale_static_keeps_the_scale_and_still_skips():
    tx = gc.loss_scale(init_scale=128.0, growth_interval=1, dynamic=False)
    state = tx.init(PARAMS)
    for bad in [None, None, NAN, None, INF, None]:
        out, state = tx.update({k: v * 128 for k, v in _grads(1, bad=bad).items()}, state)
        assert float(state.scale) == 128.0
        assert bool(gc.applied(state)) == (bad is None)
        if bad is not None:
            assert all(bool((v == 0).all()) for v in out.values())
        else:
            assert_tree_close(out, _grads(1), rtol=1e-6, atol=1e-7)


def test_loss_scale_growth_never_overflows_to_inf():
    big = 2.0**127  # float32 max is ~2**128
    tx = gc.loss_scale(init_scale=big, growth_interval=1)
    state = tx.init(PARAMS)
    for _ in range(3):
        _, state = tx.update(_grads(2), state)
        assert float(state.scale) == big
        assert int(state.growth_tracker) == 0
    # GradScaler agrees.
    scaler = torch.amp.GradScaler(device="cpu", init_scale=big, growth_interval=1)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale((p * 1e-30).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == big


def test_scale_loss():
    loss = torch.tensor(0.75)
    tx = gc.chain(gc.loss_scale(init_scale=16.0), gc.clip_by_norm(1.0), gc.sgd(0.1))
    state = tx.init(PARAMS)
    assert torch.equal(gc.scale_loss(loss, state), torch.tensor(12.0))
    assert torch.equal(gc.scale_loss(loss, gc.sgd(0.1).init(PARAMS)), loss)
    # After a backoff the new scale is used.
    _, state = tx.update(_grads(0, bad=NAN), state, PARAMS)
    assert torch.equal(gc.scale_loss(loss, state), torch.tensor(6.0))
    # differentiable: d(scale * loss)/dloss = scale
    x = torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(gc.scale_loss(x * x, state), x)
    assert float(g) == 8.0 * 2 * 2.0  # scale 8 after one backoff from 16
    two = (gc.loss_scale().init(PARAMS), gc.loss_scale().init(PARAMS))  # chain refuses it
    with pytest.raises(ValueError, match="more than one loss_scale"):
        gc.scale_loss(loss, two)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(init_scale=0.0), ValueError),
        (dict(init_scale=-1.0), ValueError),
        (dict(init_scale=INF), ValueError),
        (dict(init_scale="1"), TypeError),
        (dict(growth_factor=1.0), ValueError),
        (dict(growth_factor=INF), ValueError),
        (dict(backoff_factor=1.0), ValueError),
        (dict(backoff_factor=0.0), ValueError),
        (dict(growth_interval=0), ValueError),
        (dict(growth_interval=2.0), TypeError),
        (dict(min_scale=0.0), ValueError),
        (dict(init_scale=4.0, min_scale=8.0), ValueError),
        (dict(dynamic=1), TypeError),
    ],
)
def test_loss_scale_validates_arguments(kwargs, exc):
    with pytest.raises(exc, match="loss_scale"):
        gc.loss_scale(**kwargs)


# =========================================================================== properties
@given(grad_sequences(steps=4, nonfinite=True))
def test_property_skip_if_nonfinite(steps):
    results = check_protocol(gc.skip_if_nonfinite(), steps)
    for grads, (out, state) in zip(steps, results):
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values() if g is not None)
        assert bool(state.is_open) == finite
        for g, o in zip(grads.values(), out.values()):
            if g is not None:
                assert bool(torch.isfinite(o).all())
                assert torch.equal(o, g if finite else torch.zeros_like(g))


@given(grad_sequences(steps=4, nonfinite=True))
def test_property_loss_scale(steps):
    results = check_protocol(gc.loss_scale(init_scale=4.0, growth_interval=2), steps)
    for out, state in results:
        for o in out.values():
            if o is not None:
                assert bool(torch.isfinite(o).all())
        assert state.scale.dtype == torch.float32


@given(grad_sequences(steps=4))
def test_property_accumulate_every(steps):
    results = check_protocol(gc.accumulate_every(2), steps)
    for i, (out, state) in enumerate(results):
        assert bool(gc.applied(state)) == (i % 2 == 1)
        if i % 2 == 1:
            for k, o in out.items():
                if o is not None:
                    a, b = steps[i - 1][k], steps[i][k]
                    expected = ((a.to(o.dtype) + b) / 2).to(o.dtype)
                    torch.testing.assert_close(o, expected, rtol=1e-6, atol=1e-6)


# =========================================================================== compile / vmap / grad
def _steps_with_nonfinite(n, seed=0, bad_at=(1, 4)):
    return [_grads(seed + i, bad=NAN if i in bad_at else None) for i in range(n)]


GATES = {
    "accumulate_every": lambda: gc.accumulate_every(2),
    "accumulate_every_sum": lambda: gc.accumulate_every(3, mean=False),
    "skip_if_nonfinite": gc.skip_if_nonfinite,
    "loss_scale": lambda: gc.loss_scale(init_scale=4.0, growth_interval=2, min_scale=1.0),
}


@pytest.mark.parametrize("name", ["accumulate_every", "skip_if_nonfinite", "loss_scale"])
def test_compiled_update_matches_eager(name):
    torch._dynamo.reset()
    tx = GATES[name]()
    compiled = torch.compile(tx.update, fullgraph=True)
    assert_compiled_matches_eager(compiled, tx, PARAMS, _steps_with_nonfinite(5))


GATED_CHAINS = {
    "skip+accumulate": lambda: gc.chain(
        gc.skip_if_nonfinite(), gc.accumulate_every(2), gc.clip_by_norm(1.0), gc.adamw(1e-2)
    ),
    "accumulate": lambda: gc.chain(gc.accumulate_every(3), gc.clip_by_norm(1.0), gc.adam(1e-2)),
    "loss_scale": lambda: gc.chain(
        gc.loss_scale(init_scale=4.0, growth_interval=2), gc.clip_by_norm(1.0), gc.sgd(0.1, 0.9)
    ),
    "nested": lambda: gc.chain(
        gc.skip_if_nonfinite(), gc.chain(gc.accumulate_every(2), gc.adamw(1e-2))
    ),
}


@pytest.mark.parametrize("name", list(GATED_CHAINS))
def test_gated_chain_compiles_whole_without_recompiles(name):
    """A gated chain under torch.compile(fullgraph=True) is one graph for closed and
    applied steps (window steps, skipped non-finite steps, a None gradient) and gives the
    eager results; the rest of the chain behind the last gate is a torch.cond branch."""
    torch._dynamo.reset()
    tx = GATED_CHAINS[name]()
    params = dict(PARAMS, n=torch.zeros(2, dtype=torch.float64))
    # Non-finite steps only where a gate keeps them out of the state (a nan float64 0-dim
    # state value recompiles: dynamo specializes such values, gates or not).
    bad_at = () if name == "accumulate" else (1, 4)
    steps = [dict(g, n=None if i == 2 else torch.full((2,), float(i), dtype=torch.float64))
             for i, g in enumerate(_steps_with_nonfinite(7, bad_at=bad_at))]
    counts = torch._dynamo.utils.counters["stats"]
    before = counts["unique_graphs"]
    compiled = torch.compile(tx.update, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_compiled_matches_eager(compiled, tx, params, steps[:2] + steps[3:])
    assert counts["unique_graphs"] - before == 1
    # A None gradient is another structure: one more graph, the same results.
    assert_compiled_matches_eager(compiled, tx, params, steps[2:4])


@pytest.mark.parametrize("name", list(GATES))
def test_vmap_over_a_batch_of_states_matches_a_loop(name):
    tx = GATES[name]()
    params_list = [{k: v + i for k, v in PARAMS.items()} for i in range(4)]
    steps = [
        [_grads(10 * t + i, bad=(INF if (t + i) % 3 == 0 else None)) for i in range(4)]
        for t in range(4)
    ]
    assert_vmap_matches_loop(tx, params_list, steps)


@pytest.mark.parametrize("name", ["loss_scale", "accumulate_every"])
def test_gradients_flow_through_update(name):
    tx = GATES[name]()
    params = {"w": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    other = {"w": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    target = torch.randn(3, dtype=torch.float64)

    def loss_of_grad(gw):
        grads = {"w": gw, "b": other["b"]}
        state = tx.init(params)
        if name == "accumulate_every":
            _, state = tx.update(other, state, params)  # first micro-step of the window
        updates, state = tx.update(grads, state, params)
        new = gc.apply_updates(params, updates)
        return ((new["w"] - target) ** 2).sum() + (new["b"] ** 3).sum()

    gw = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_of_grad(gw), gw)
    assert bool((grad != 0).any())
    assert torch.autograd.gradcheck(loss_of_grad, (gw,))


# =========================================================================== give-up / k schedule
def _optax():
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax, optax


def _finite_pattern_steps(pattern):
    """float64 gradients, non-finite where ``pattern`` has an ``x``."""
    return [_grads(i, torch.float64, bad=NAN if c == "x" else None) for i, c in enumerate(pattern)]


@pytest.mark.parametrize("limit", [0, 2])
@pytest.mark.parametrize("pattern_kind", ["below", "above"])
def test_skip_give_up_against_optax_apply_if_finite(limit, pattern_kind):
    """Up to ``limit`` non-finite steps in a row: the same skips, outputs and counters as
    optax.apply_if_finite(inner, limit). One more: optax passes the non-finite update on,
    gradchain raises FloatingPointError with the inputs untouched."""
    jax, optax = _optax()
    import numpy as np

    run = "x" * limit
    # below: every run of non-finite steps is at most ``limit`` long; above: one run of
    # limit + 1 (the last step).
    pattern = f"..{run}.{run}." if pattern_kind == "below" else f".{run}.{run}x"
    steps = _finite_pattern_steps(pattern)
    params = {k: v.double() + 1.0 for k, v in PARAMS.items()}
    tx = gc.chain(gc.skip_if_nonfinite(max_consecutive_errors=limit), gc.sgd(0.1, momentum=0.9))
    ref = optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), limit)
    jparams = {k: jax.numpy.asarray(v.numpy()) for k, v in params.items()}
    state, ref_state = tx.init(params), ref.init(jparams)
    for i, g in enumerate(steps):
        ref_out, ref_state = ref.update({k: jax.numpy.asarray(v.numpy()) for k, v in g.items()},
                                        ref_state, jparams)
        ref_passed_nonfinite = not all(bool(np.isfinite(np.asarray(v)).all())
                                       for v in ref_out.values())
        if ref_passed_nonfinite:
            # optax gives up here: gradchain raises instead, and nothing was touched.
            assert pattern_kind == "above" and i == len(steps) - 1
            before = clone_tree(state)
            with pytest.raises(FloatingPointError, match=f"max_consecutive_errors={limit}"):
                tx.update(g, state, params)
            assert_tree_equal(state, before)
            return
        out, state = tx.update(g, state, params)
        for k in out:
            np.testing.assert_allclose(out[k].numpy(), np.asarray(ref_out[k]), rtol=1e-12, atol=0)
        assert int(state[0].consecutive_skips) == int(ref_state.notfinite_count)
        assert int(state[0].total_skips) == int(ref_state.total_notfinite)
        assert bool(state[0].is_open) == bool(ref_state.last_finite)
    assert pattern_kind == "below"


def test_skip_give_up_none_skips_forever_and_validates():
    tx = gc.skip_if_nonfinite()
    state = tx.init(PARAMS)
    for i in range(20):
        _, state = tx.update(_grads(i, bad=INF), state)
    assert int(state.consecutive_skips) == 20
    for bad, exc in [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)]:
        with pytest.raises(exc, match="max_consecutive_errors"):
            gc.skip_if_nonfinite(max_consecutive_errors=bad)


def test_skip_give_up_under_compile_and_refused_under_vmap():
    torch._dynamo.reset()
    tx = gc.skip_if_nonfinite(max_consecutive_errors=1)
    compiled = torch.compile(tx.update, fullgraph=True)
    state = tx.init(PARAMS)
    _, state = compiled(_grads(0, bad=NAN), state)
    _, state = compiled(_grads(1), state)
    _, state = compiled(_grads(2, bad=NAN), state)
    assert int(state.consecutive_skips) == 1
    with pytest.raises(RuntimeError, match="max_consecutive_errors=1"):
        compiled(_grads(3, bad=NAN), state)
    batched = torch.func.vmap(tx.init)({k: v.expand(2, *v.shape) for k, v in PARAMS.items()})
    grads = {k: v.expand(2, *v.shape) for k, v in _grads(0).items()}
    with pytest.raises(TypeError, match="vmap"):
        torch.func.vmap(tx.update)(grads, batched)


def test_skip_give_up_in_adapter_discards_the_call():
    model = torch.nn.Linear(2, 1)
    opt = gc.ChainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        gc.skip_if_nonfinite(max_consecutive_errors=1),
    )
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        model.weight.grad = torch.full_like(model.weight, NAN)
        model.bias.grad = torch.ones_like(model.bias)
        if _ == 0:
            opt.step()
    with pytest.raises(FloatingPointError):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert int(gc.tree_get(opt.tx_state, "consecutive_skips")) == 1


def _multisteps_schedule(w):
    return 1 if w < 2 else (3 if w < 4 else 2)


def test_accumulate_schedule_against_optax_multisteps():
    """Window lengths from a schedule of the window count: same emitted updates and inner
    state trajectory as optax.MultiSteps(every_k_schedule=...) (float64)."""
    jax, optax = _optax()
    import numpy as np

    params = {k: v.double() + 0.5 for k, v in PARAMS.items()}
    steps = [_grads(i, torch.float64) for i in range(17)]
    tx = gc.chain(gc.accumulate_every(_multisteps_schedule), gc.adam(1e-2))
    ref = optax.MultiSteps(optax.adam(1e-2, eps=1e-8), every_k_schedule=_multisteps_schedule,
                           accumulator_dtype=jax.numpy.float64)
    jparams = {k: jax.numpy.asarray(v.numpy()) for k, v in params.items()}
    state, ref_state = tx.init(params), ref.init(jparams)
    emitted = []
    for g in steps:
        ref_out, ref_state = ref.update({k: jax.numpy.asarray(v.numpy()) for k, v in g.items()},
                                        ref_state, jparams)
        out, state = tx.update(g, state, params)
        for k in out:
            np.testing.assert_allclose(out[k].numpy(), np.asarray(ref_out[k]), rtol=1e-10,
                                       atol=1e-300)
        assert bool(gc.applied(state)) == bool(ref.has_updated(ref_state))
        assert int(state[0].mini_step) == int(ref_state.mini_step)
        assert int(state[0].windows) == int(ref_state.gradient_step)
        emitted.append(int(gc.applied(state)))
    # windows of 1, 1, 3, 3, 2, 2, 2, ...: the tail advances once per window
    assert emitted == [1, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert int(gc.tree_get(state, gc.ScaleByAdamState).count) == sum(emitted)  # once per window
    for t in (state[0].mini_step, state[0].windows, state[0].length):
        assert t.device.type == "cpu"


def test_accumulate_schedule_flush_is_exact_and_starts_the_next_window():
    tx = gc.accumulate_every(lambda w: 4 if w == 0 else 2)
    state = tx.init(PARAMS)
    gs = [_grads(i, torch.float64) for i in range(5)]
    state = tx.init({k: v.double() for k, v in PARAMS.items()})
    _, state = tx.update(gs[0], state)
    out, state = tx.update(gs[1], state, flush=True)
    assert bool(gc.applied(state)) and int(state.windows) == 1 and int(state.length) == 2
    for k in out:
        assert torch.equal(out[k], (gs[0][k] + gs[1][k]) / 2)
    _, state = tx.update(gs[2], state)
    assert not bool(gc.applied(state))
    out, state = tx.update(gs[3], state)
    assert bool(gc.applied(state))
    for k in out:
        assert torch.equal(out[k], (gs[2][k] + gs[3][k]) / 2)


def test_accumulate_schedule_compiled_and_vmapped_match_eager():
    torch._dynamo.reset()

    def sched(w):  # a tensor schedule: traceable
        return torch.where(w < 1, 1, 3)

    tx = gc.accumulate_every(sched)
    compiled = torch.compile(tx.update, fullgraph=True)
    assert_compiled_matches_eager(compiled, tx, PARAMS, [_grads(i) for i in range(8)])
    params_list = [{k: v + i for k, v in PARAMS.items()} for i in range(3)]
    steps = [[_grads(10 * t + i) for i in range(3)] for t in range(5)]
    assert_vmap_matches_loop(tx, params_list, steps)


def test_accumulate_schedule_checkpoint_and_validation():
    tx = gc.chain(gc.accumulate_every(_multisteps_schedule), gc.sgd(0.1))
    state = tx.init(PARAMS)
    for i in range(5):
        _, state = tx.update(_grads(i), state, PARAMS)
    again = _roundtrip(state, tx.init(PARAMS))
    assert_tree_equal(again, state)
    # A fixed-n checkpoint does not load into a scheduled one (and vice versa).
    with pytest.raises(ValueError, match="every"):
        _roundtrip(gc.accumulate_every(3).init(PARAMS),
                   gc.accumulate_every(_multisteps_schedule).init(PARAMS))
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="whole number >= 1"):
            gc.accumulate_every(lambda w, bad=bad: bad).init(PARAMS)
    bad_later = gc.accumulate_every(lambda w: 1 if w < 1 else 0)
    state = bad_later.init(PARAMS)
    with pytest.raises(ValueError, match="at window 1"):
        bad_later.update(_grads(0), state)


def test_a_gate_behind_a_closed_nested_chain_checks_its_zero_views():
    """Found by the laws (chain(chain(identity(), tx), skip_if_nonfinite()) with tx a
    chain holding a gate): a closed chain emits broadcast zero views, and a later
    skip_if_nonfinite must check them (GradScaler's kernel refuses self-overlapping
    tensors)."""
    # (without the adamw the laws drew in inner: a gate after a rule is refused now)
    inner = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.scale_by_adam())
    tx = gc.chain(gc.chain(gc.identity(), inner), gc.skip_if_nonfinite())
    params = {"w": torch.zeros(3), "e": torch.empty(2, 0)}
    state = tx.init(params)
    grads = {"w": torch.tensor([1.0, NAN, 2.0]), "e": torch.empty(2, 0)}
    out, state = tx.update(grads, state, params)
    assert not bool(gc.applied(state))
    assert bool((out["w"] == 0).all())
    assert int(state[1].total_skips) == 0  # zeros are finite: the second gate stays open
    out, state = tx.update({"w": torch.ones(3), "e": torch.empty(2, 0)}, state, params)
    assert bool(gc.applied(state))


# --------------------------------------------------------------------------- one-walk decision
@pytest.mark.parametrize(("make", "sets_errors"), [
    (lambda: gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2), gc.sgd(0.1)), False),
    (lambda: gc.chain(gc.clip_by_norm(1.0, error_if_nonfinite=True), gc.accumulate_every(3)),
     True),
    (lambda: gc.chain(gc.loss_scale(), gc.clip_by_norm(1.0, error_if_nonfinite=True)), True),
    (lambda: gc.partition({"a": gc.chain(gc.skip_if_nonfinite(), gc.sgd(0.1)),
                           "b": gc.clip_by_norm(1.0, error_if_nonfinite=True)},
                          {"w": "a", "v": "b"}), True),
    (lambda: gc.clip_by_norm(1.0), False),
], ids=["skip+accumulate", "clip-error+accumulate", "loss_scale+clip-error", "partition",
        "clip"])
def test_decision_agrees_with_step_flag_and_new_errors(make, sets_errors: bool) -> None:
    """gating.decision (the adapter's one walk per step, with the last step's error flags
    carried over) gives what step_flag and new_errors give, step after step."""
    tx = make()
    params = {"w": torch.zeros(2), "v": torch.zeros(3)}
    state = tx.init(params)
    errors = gating.decision(state, []).errors
    seen = 0
    for k, bad in enumerate([None, math.nan, None, None, math.inf, None, None]):
        grads = {"w": torch.full((2,), float(k + 1)), "v": torch.ones(3)}
        if bad is not None:
            grads["v"] = torch.tensor([bad, 1.0, 1.0])
        _, new_state = tx.update(grads, state, params)
        found = gating.decision(new_state, errors)
        expected_flag = gating.step_flag(new_state)
        assert type(found.flag) is type(expected_flag)
        assert bool(found.flag) == bool(expected_flag)
        expected = gating.new_errors(new_state, state)
        assert len(found.new_errors) == len(expected)
        assert all(a is b for a, b in zip(found.new_errors, expected))
        seen += len(expected)
        state, errors = new_state, found.errors
    assert (seen > 0) == sets_errors  # the nan and inf steps set the error flags
