"""gradchain.transforms against optax on the same inputs (float64), and the testing kit's laws.

Each transformation is run step by step beside its optax namesake (jax_enable_x64) on the
same float64 inputs, and the updates and states compared. ``add_noise`` draws its samples
from a counter-based generator (not jax's PRNG), so its distribution, variance schedule and
determinism are tested instead of its bits. Parity figures: ``rel`` in each test is the
largest relative difference measured (run ``python tests/test_transforms.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import optree
import pytest
import torch

import gradchain as gc
from gradchain.testing import check_transformation
from gradchain.testing import strategies as gst
from gradchain.transforms import (
    ParamEmaState,
    SkipLargeUpdatesState,
    add_noise,
    apply_every,
    centralize,
    conditionally_mask,
    ema,
    ema_params,
    freeze,
    lookahead,
    param_ema,
    set_to_zero,
    skip_large_updates,
    zero_nans,
)

F64 = torch.float64


# --------------------------------------------------------------------------- optax helpers
@pytest.fixture(scope="module")
def ox():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax, optax
    jax.config.update("jax_enable_x64", before)


def to_jax(tree: Any) -> Any:
    import jax.numpy as jnp

    return optree.tree_map(lambda t: jnp.asarray(t.detach().numpy()), tree)


def to_np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rel_diff(ours: Any, theirs: Any) -> float:
    """The largest leafwise normwise relative difference, max|ours - theirs| / max|theirs|,
    over two trees (equal entries, nan and inf included, count as no difference)."""
    a = [np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
         for x in optree.tree_leaves(ours)]
    b = [to_np(x) for x in optree.tree_leaves(theirs)]
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        if same.all():
            continue
        finite = np.abs(np.where(np.isfinite(y), y, 0.0)).max(initial=0.0)
        with np.errstate(invalid="ignore"):
            d = np.where(same, 0.0, np.abs(x - y)) / max(finite, 1e-300)
        worst = max(worst, float(np.nan_to_num(d, nan=np.inf).max(initial=0.0)))
    return worst


def grads_seq(steps: int, seed: int = 0, shapes=None) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (3, 4), "b": (4,), "s": ()}
    return [{k: torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}
            for _ in range(steps)]


def run_both(ours, theirs, params, grads, apply=True):
    """Run the two side by side; returns the largest relative difference of the updates
    (and of the params when applied)."""
    import optax

    s1, s2 = ours.init(params), theirs.init(to_jax(params))
    p1, p2 = params, to_jax(params)
    worst = 0.0
    for g in grads:
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(to_jax(g), s2, p2)
        worst = max(worst, rel_diff(u1, u2))
        if apply:
            p1, p2 = gc.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            worst = max(worst, rel_diff(p1, p2))
    return worst, s1, s2


# --------------------------------------------------------------------------- parity
def test_zero_nans_matches_optax(ox):
    _, optax = ox
    g = {"w": torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]], dtype=F64),
         "b": torch.tensor([float("-inf"), 3.0], dtype=F64)}
    tx, ref = zero_nans(), optax.zero_nans()
    u1, s1 = tx.update(g, tx.init(g))
    u2, s2 = ref.update(to_jax(g), ref.init(to_jax(g)))
    assert rel_diff(u1, u2) == 0.0
    assert {k: bool(v) for k, v in s1.found_nan.items()} == {
        k: bool(v) for k, v in s2.found_nan.items()}


@pytest.mark.parametrize("debias", [True, False])
def test_ema_matches_optax(ox, debias):
    _, optax = ox
    params = grads_seq(1, seed=9)[0]
    rel, s1, s2 = run_both(ema(0.9, debias=debias), optax.ema(0.9, debias=debias), params,
                           grads_seq(6))
    assert rel <= 1e-15, rel
    assert rel_diff(s1.ema, s2.ema) <= 1e-15 and int(s1.count) == int(s2.count) == 6


def test_centralize_matches_optax(ox):
    _, optax = ox
    shapes = {"conv": (2, 3, 2, 2), "w": (3, 4), "b": (4,), "s": (), "e": (0, 3)}
    rel, _, _ = run_both(centralize(), optax.centralize(), grads_seq(1, 3, shapes)[0],
                         grads_seq(2, 4, shapes))
    assert rel <= 1e-15, rel


def test_set_to_zero_matches_optax(ox):
    _, optax = ox
    rel, _, _ = run_both(set_to_zero(), optax.set_to_zero(), grads_seq(1, 1)[0], grads_seq(2))
    assert rel == 0.0


def test_freeze_matches_optax(ox):
    _, optax = ox
    mask = {"w": True, "b": False, "s": True}
    params = grads_seq(1, 1)[0]
    ours = gc.chain(gc.sgd(0.1, momentum=0.9), freeze(mask))
    theirs = optax.chain(optax.sgd(0.1, momentum=0.9), optax.freeze(mask))
    rel, _, _ = run_both(ours, theirs, params, grads_seq(4))
    assert rel <= 1e-15, rel
    for m, t in ((True, optax.freeze(True)), (False, optax.freeze(False))):
        rel, _, _ = run_both(freeze(m), t, params, grads_seq(2))
        assert rel == 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_apply_every_matches_optax(ox, k):
    _, optax = ox
    params = grads_seq(1, 1)[0]
    rel, s1, s2 = run_both(apply_every(k), optax.apply_every(k), params, grads_seq(7))
    assert rel <= 1e-15, rel
    assert int(s1.count) == int(s2.count)
    assert rel_diff(s1.grad_acc, s2.grad_acc) <= 1e-15


def test_skip_large_updates_matches_optax_multisteps(ox):
    """chain(skip_large_updates(x), adam) is MultiSteps(adam, 1, should_skip_update_fn=
    partial(skip_large_updates, max_squared_norm=x)): refused steps emit zeros and leave
    adam's state (its count included) alone."""
    _, optax = ox
    grads = grads_seq(8, seed=5)
    for i in (1, 4, 5):
        grads[i] = {k: 10.0 * v for k, v in grads[i].items()}
    grads[6] = {k: v.clone() for k, v in grads[6].items()}
    grads[6]["b"][0] = float("nan")
    bound = 40.0  # 10x steps have squared norms ~ 1700, the others ~ 17
    params = grads_seq(1, 1)[0]
    ours = gc.chain(skip_large_updates(bound), gc.adam(0.1))
    skip = functools.partial(optax.skip_large_updates, max_squared_norm=bound)
    theirs = optax.MultiSteps(optax.adam(0.1), 1, should_skip_update_fn=skip)
    rel, s1, s2 = run_both(ours, theirs, params, grads)
    assert rel <= 1e-13, rel
    gate = gc.tree_get(s1, SkipLargeUpdatesState)
    assert int(gate.total_skips) == 4 and bool(gate.is_open)
    assert int(gc.tree_get(s1, gc.ScaleByAdamState).count) == 4
    # The recorded squared norm is optax's.
    g = grads[0]
    _, st = skip_large_updates(bound).update(g, skip_large_updates(bound).init(g))
    want = float(skip(to_jax(g), 0, None)[1]["norm_squared"])
    assert float(st.norm_squared) == pytest.approx(want, rel=1e-15)


def test_conditionally_mask_matches_optax(ox):
    _, optax = ox
    import jax.numpy as jnp

    params = grads_seq(1, 1)[0]
    ours = conditionally_mask(gc.adam(0.1), lambda step: step % 3 != 1)
    theirs = optax.conditionally_mask(optax.adam(0.1), lambda step: jnp.mod(step, 3) != 1)
    rel, s1, s2 = run_both(ours, theirs, params, grads_seq(7, seed=2))
    assert rel <= 1e-13, rel
    assert int(s1.step) == int(s2.step) == 7
    assert int(gc.tree_get(s1.inner_state, gc.ScaleByAdamState).count) == 5  # steps 0,2,3,5,6


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_matches_optax(ox, reset_state):
    """optax keeps (fast, slow) in LookaheadParams; gradchain keeps slow in the state. The
    fast trajectory and the slow params agree (gc.sgd with momentum is optax.sgd's)."""
    _, optax = ox
    params = grads_seq(1, 1)[0]
    ours = lookahead(gc.sgd(0.1, momentum=0.9), 3, 0.5, reset_state=reset_state)
    theirs = optax.lookahead(optax.sgd(0.1, momentum=0.9), 3, 0.5, reset_state=reset_state)
    s1, s2 = ours.init(params), theirs.init(optax.LookaheadParams.init_synced(to_jax(params)))
    p1, p2 = params, optax.LookaheadParams.init_synced(to_jax(params))
    worst = 0.0
    for g in grads_seq(8, seed=3):
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(to_jax(g), s2, p2)
        p1, p2 = gc.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        worst = max(worst, rel_diff(p1, p2.fast), rel_diff(s1.slow, p2.slow))
    assert worst <= 1e-14, worst
    assert int(s1.steps_since_sync) == int(s2.steps_since_sync) == 2


def test_lookahead_needs_params():
    tx = lookahead(gc.sgd(0.1), 2, 0.5)
    p = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="params are required"):
        tx.update(p, tx.init(p))


# --------------------------------------------------------------------------- param_ema
def test_param_ema_functional_matches_averaged_model_and_optax(ox):
    """Functional use: last in the chain, track='next' averages the params after each step,
    exactly as AveragedModel(get_ema_multi_avg_fn) updated after each optimizer step (its
    first call copies; ours starts from the initial params, hence one extra step at 0)."""
    _, optax = ox
    decay = 0.8
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = gc.chain(gc.sgd(0.1), param_ema(decay))
    state = tx.init(params)
    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))
    averaged.update_parameters(model)  # copies the initial params, as our init does
    ref = to_jax(params)
    for g in grads_seq(5, seed=7, shapes={k: tuple(v.shape) for k, v in params.items()}):
        updates, state = tx.update(g, state, params)
        params = gc.apply_updates(params, updates)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(params[k])
        averaged.update_parameters(model)
        ref = optax.incremental_update(to_jax(params), ref, 1.0 - decay)
    ours = ema_params(state)
    for k, p in averaged.module.named_parameters():
        assert torch.equal(ours[k], p.detach()), k  # same lerp kernel: bit for bit
    assert rel_diff(ours, ref) <= 1e-15
    assert int(gc.tree_get(state, ParamEmaState).count) == 5


def test_param_ema_with_chained_optimizer():
    """ChainedOptimizer: the chain runs before the wrapped step and sees the params as they
    are (track='given'), so after n steps the average holds the params of steps 0..n-1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                              gc.chain(gc.clip_by_norm(1.0), param_ema(0.5, track="given")))
    seen = []
    for _ in range(3):
        seen.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    avg = ema_params(opt.tx_state)
    want = [s.clone() for s in seen[0]]
    for step in seen:
        want = [torch.lerp(w, s, 0.5) for w, s in zip(want, step)]
    got = [x for group in avg for x in group]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The average is usable for evaluation with functional_call.
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, got)), (torch.ones(1, 3),))
    assert out.shape == (1, 2)


def test_param_ema_none_leaf_does_not_advance():
    tx = param_ema(0.5, track="given")
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    state = tx.init(params)
    moved = {"w": torch.full((2,), 3.0), "b": torch.full((1,), 3.0)}
    _, state = tx.update({"w": torch.zeros(2), "b": None}, state, moved)
    assert torch.equal(state.ema["w"], torch.full((2,), 2.0))
    assert torch.equal(state.ema["b"], torch.ones(1))


# --------------------------------------------------------------------------- add_noise
def _noise(tx, n=200_000, steps=3, seed_tree=None):
    g = {"a": torch.zeros(n, dtype=F64), "b": torch.zeros(n // 2, dtype=F64)}
    state = tx.init(g)
    outs = []
    for _ in range(steps):
        out, state = tx.update(g, state)
        outs.append(out)
    return outs, state


def test_add_noise_variance_schedule_and_distribution(ox):
    jax, optax = ox
    eta, gamma = 0.3, 0.55
    outs, state = _noise(add_noise(eta, gamma, seed=1))
    ref = optax.add_noise(eta, gamma, key=1)
    rs = ref.init(to_jax({"a": torch.zeros(200_000, dtype=F64)}))
    for t, out in enumerate(outs, 1):
        want_std = math.sqrt(eta / t**gamma)
        x = torch.cat([out["a"], out["b"]])
        n = x.numel()
        # Sample mean within 5 standard errors, sample std within 5 standard errors.
        assert abs(float(x.mean())) < 5 * want_std / math.sqrt(n)
        assert abs(float(x.std()) / want_std - 1) < 5 / math.sqrt(2 * n)
        # optax's samples have the same spread at the same step.
        r, rs = ref.update(to_jax({"a": torch.zeros(200_000, dtype=F64)}), rs)
        assert abs(float(np.std(to_np(r["a"]))) / float(x.std()) - 1) < 0.02
        # Normal: Kolmogorov-Smirnov distance to N(0, std^2) (critical value 1.63/sqrt(n)
        # at the 1% level).
        z = torch.sort(x / want_std).values
        cdf = torch.special.ndtr(z)
        grid = torch.arange(1, n + 1, dtype=F64) / n
        ks = float(torch.maximum((grid - cdf).abs(), (cdf - (grid - 1.0 / n)).abs()).max())
        assert ks < 1.63 / math.sqrt(n), ks
    assert int(state.count) == 3


def test_add_noise_deterministic_and_seeded():
    a, _ = _noise(add_noise(0.1, 0.0, seed=7), n=1000, steps=2)
    b, _ = _noise(add_noise(0.1, 0.0, seed=7), n=1000, steps=2)
    c, _ = _noise(add_noise(0.1, 0.0, seed=8), n=1000, steps=2)
    assert torch.equal(a[0]["a"], b[0]["a"]) and torch.equal(a[1]["b"], b[1]["b"])
    assert not torch.equal(a[0]["a"], c[0]["a"])
    assert not torch.equal(a[0]["a"], a[1]["a"])  # a new draw each step
    # Leaves and steps are uncorrelated.
    for x, y in ((a[0]["a"][:500], a[0]["b"]), (a[0]["a"], a[1]["a"]), (a[0]["a"], c[0]["a"])):
        assert abs(float(torch.corrcoef(torch.stack([x[:500], y[:500]]))[0, 1])) < 0.2


def test_add_noise_vmap_gives_each_member_its_seed():
    tx = add_noise(0.1, 0.0, seed=0)
    g = {"w": torch.zeros(64, dtype=F64)}
    states = [tx.init(g)._replace(seed=torch.tensor(s)) for s in (3, 4)]
    stacked = optree.tree_map(lambda *x: torch.stack(x), *states)
    gs = {"w": torch.zeros(2, 64, dtype=F64)}
    out, _ = torch.func.vmap(lambda u, s: tx.update(u, s))(gs, stacked)
    for i, s in enumerate(states):
        assert torch.equal(out["w"][i], tx.update(g, s)[0]["w"])


# --------------------------------------------------------------------------- gates and masks
def test_skip_large_updates_no_sync_and_gate_semantics():
    tx = gc.chain(skip_large_updates(1.0), gc.sgd(0.1, momentum=0.9))
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"w": torch.tensor([0.1, 0.1])}, state, params)
    buf = gc.tree_get(state, gc.TraceState).trace["w"].clone()
    out, state = tx.update({"w": torch.tensor([3.0, 0.0])}, state, params)
    assert torch.equal(out["w"], torch.zeros(2)) and not bool(gc.applied(state))
    assert torch.equal(gc.tree_get(state, gc.TraceState).trace["w"], buf)
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    out_c, _ = compiled({"w": torch.tensor([3.0, 0.0])}, state, params)
    assert torch.equal(out_c["w"], torch.zeros(2))


def test_conditionally_mask_python_bool_condition_skips_inner_work():
    calls = []

    def inner_update(u, s, p=None, **kw):
        calls.append(1)
        return u, s

    inner = gc.GradientTransformation(lambda p: gc.EmptyState(), inner_update)
    tx = conditionally_mask(inner, lambda step: False)
    out, state = tx.update({"w": torch.ones(2)}, tx.init({}))
    assert calls == [] and torch.equal(out["w"], torch.zeros(2)) and int(state.step) == 1
    with pytest.raises(TypeError, match="0-dim bool"):
        conditionally_mask(inner, lambda step: step * 2).update({"w": torch.ones(1)},
                                                               tx.init({}))


@pytest.mark.parametrize(
    "factory,kwargs,exc,match",
    [
        (ema, dict(decay=1.5), ValueError, "decay must be in"),
        (add_noise, dict(eta=-1.0, gamma=0.5, seed=0), ValueError, "eta must be >= 0"),
        (add_noise, dict(eta=1.0, gamma=0.5, seed=0.5), TypeError, "seed must be an int"),
        (apply_every, dict(k=0), ValueError, "k must be >= 1"),
        (skip_large_updates, dict(max_squared_norm=0.0), ValueError, "max_squared_norm"),
        (lookahead, dict(fast_optimizer=gc.sgd(0.1), sync_period=0, slow_step_size=0.5), ValueError, "sync_period"),
        (lookahead, dict(fast_optimizer=gc.sgd(0.1), sync_period=2, slow_step_size=1.5), ValueError, "slow_step_size"),
        (lookahead, dict(fast_optimizer=None, sync_period=2, slow_step_size=0.5), TypeError, "fast_optimizer"),
        (param_ema, dict(decay=0.9, track="after"), ValueError, "track"),
        (conditionally_mask, dict(inner=gc.sgd(0.1), should_transform_fn=3), TypeError, "should_transform_fn"),
    ],
)  # fmt: skip
def test_invalid_arguments(factory, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        factory(**kwargs)


# --------------------------------------------------------------------------- laws
def _freeze_mask(params: Any) -> Any:
    return gst.every_other_leaf(params)


LAWS = {
    "zero_nans": lambda: zero_nans(),
    "ema": lambda: ema(0.9),
    "ema(no debias, float64 acc)": lambda: ema(0.5, debias=False, accumulator_dtype=torch.float64),
    "centralize": lambda: centralize(),
    "add_noise": lambda: add_noise(0.01, 0.55, seed=0),
    "set_to_zero": lambda: set_to_zero(),
    "freeze": lambda: freeze(_freeze_mask),
    "apply_every(3)": lambda: apply_every(3),
    "skip_large_updates": lambda: skip_large_updates(10.0),
    "conditionally_mask": lambda: conditionally_mask(gc.adam(0.1), lambda s: s % 2 == 0),
    "lookahead": lambda: lookahead(gc.sgd(0.1, momentum=0.9), 2, 0.5),
    "param_ema": lambda: param_ema(0.9),
    "param_ema(given)": lambda: param_ema(0.9, track="given"),
}


@pytest.mark.parametrize("name", list(LAWS))
def test_laws(name):
    check_transformation(LAWS[name](), vmap=True, max_examples=15)


def test_lookahead_reset_state_laws():
    """reset_state re-inits the whole fast state on a sync step, also the part that belongs
    to a param without a gradient on that step (documented): every other law holds."""
    tx = lookahead(gc.sgd(0.1, momentum=0.9), 2, 0.5, reset_state=True)
    check_transformation(tx, vmap=True, none_passthrough=False, max_examples=15)


@pytest.mark.parametrize("name", ["add_noise", "apply_every(3)", "skip_large_updates",
                                  "conditionally_mask", "lookahead"])
def test_compile_law(name):
    check_transformation(LAWS[name](), purity=False, determinism=False, extra_kwargs=False,
                         none_passthrough=False, update_structure=False,
                         state_structure=False, round_trip=False, compile=True,
                         compile_examples=2, compile_backend="aot_eager")



def test_compile_law_of_the_rest_in_one_chain():
    """The transformations not compiled above trace as one graph too (one compile for all)."""
    tx = gc.chain(zero_nans(), centralize(), gc.adaptive_grad_clip(0.1),
                  gc.clip_by_block_rms(1.0), ema(0.9), gc.sgd(0.1), freeze(_freeze_mask),
                  param_ema(0.9))
    check_transformation(tx, purity=False, determinism=False, extra_kwargs=False,
                         none_passthrough=False, update_structure=False,
                         state_structure=False, round_trip=False, compile=True,
                         compile_examples=2, compile_backend="aot_eager")

def test_add_noise_inductor_bits_equal_eager():
    """The generator's int64 arithmetic wraps the same way in inductor's C++ as in eager."""
    torch._dynamo.reset()
    tx = add_noise(0.1, 0.5, seed=3)
    g = {"w": torch.zeros(1000), "b": torch.zeros(3, dtype=F64)}
    compiled = torch.compile(tx.update, fullgraph=True)
    se = sc = tx.init(g)
    for _ in range(2):
        (ue, se), (uc, sc) = tx.update(g, se), compiled(g, sc)
        assert torch.equal(ue["w"], uc["w"]) and torch.equal(ue["b"], uc["b"])
    torch._dynamo.reset()


def test_skip_large_updates_in_chained_optimizer_skips_the_wrapped_step():
    model = torch.nn.Linear(2, 1)
    opt = gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                              gc.chain(skip_large_updates(1.0)))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    opt.step()
    assert not opt.last_step_applied
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    opt.step()
    assert opt.last_step_applied
    assert not torch.equal(model.weight.detach(), before[0])


def test_freeze_accepts_a_0d_bool_tensor():
    g = {"w": torch.ones(2)}
    assert torch.equal(freeze(torch.tensor(True)).update(g, None)[0]["w"], torch.zeros(2))
    assert freeze(torch.tensor(False)).update(g, None)[0]["w"] is g["w"]


if __name__ == "__main__":  # print the parity figures
    import sys

    sys.exit(pytest.main([__file__, "-q", "-k", "optax"]))
