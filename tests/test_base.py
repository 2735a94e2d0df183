"""The protocol: GradientTransformation, identity, chain (with gates), applied, apply_updates."""

from __future__ import annotations

from typing import Any, NamedTuple

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

NAN, INF = float("nan"), float("inf")
PARAMS = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def _grads(seed, bad=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    g = {
        "w": torch.randn(3, 2, generator=gen, dtype=dtype),
        "b": torch.randn(2, generator=gen, dtype=dtype),
    }
    if bad is not None:
        g["b"][1] = bad
    return g


def _zero(tree):
    return all(bool((v == 0).all()) for v in leaves(tree) if v is not None)


def _recorder(log: list, factor: float = 1.0) -> gc.GradientTransformation:
    """A stateful test transformation: scales by ``factor``, counts calls, logs extras."""

    def init(params):
        return (torch.zeros((), dtype=torch.int64),)

    def update(updates, state, params=None, **extra):
        log.append(extra)
        return {k: None if v is None else v * factor for k, v in updates.items()}, (state[0] + 1,)

    return gc.GradientTransformation(init, update)


# --------------------------------------------------------------------------- basics
def test_identity_and_empty_state():
    tx = gc.identity()
    assert tx.init(PARAMS) == gc.EmptyState()
    g = _grads(0)
    out, state = tx.update(g, tx.init(PARAMS), PARAMS, anything=1)
    assert out is g and state == gc.EmptyState()
    assert isinstance(tx, tuple) and len(tx) == 2


def test_stateless_builds_a_transformation_from_a_function():
    seen: dict[str, Any] = {}

    def double(updates: Any, params: Any) -> Any:
        return {k: None if u is None else 2 * u for k, u in updates.items()}

    def record(updates: Any, params: Any, **extra: Any) -> Any:
        seen.update(extra, params=params)
        return updates

    tx = gc.stateless(double)
    params = {"w": torch.zeros(2), "b": torch.zeros(1)}
    state = tx.init(params)
    assert state == gc.EmptyState()
    out, new_state = tx.update({"w": torch.ones(2), "b": None}, state, params)
    assert torch.equal(out["w"], torch.full((2,), 2.0)) and out["b"] is None
    assert new_state is state
    assert tx.update({"w": torch.ones(2), "b": None}, None)[1] is None  # None as the state
    # A chain's extras reach a function that takes them, and skip one that does not.
    chained = gc.chain(gc.stateless(record), tx)
    out, _ = chained.update({"w": torch.ones(2), "b": None}, chained.init(params), params,
                            flush=True)
    assert seen["flush"] is True and seen["params"] is params
    assert torch.equal(out["w"], torch.full((2,), 2.0))
    # A partial and a callable object: their signatures decide the same way.
    import functools

    class Scale:
        def __call__(self, updates: Any, params: Any, **extra: Any) -> Any:
            seen["object"] = extra.get("flush")
            return double(updates, params)

    via_partial = gc.stateless(functools.partial(lambda updates, params, k: updates, k=1))
    assert via_partial.update({"w": torch.ones(2)}, None, flush=True)[0]["w"].sum() == 2
    gc.stateless(Scale(), "scale_obj").update({"w": torch.ones(2)}, None, flush=True)
    assert seen["object"] is True
    # Another transformation's state is refused, naming the function.
    with pytest.raises(TypeError, match=r"^double\.update: state must be the EmptyState"):
        tx.update({"w": torch.ones(2), "b": None}, gc.clip_by_norm(1.0).init(params))
    with pytest.raises(TypeError, match="fn must be a function"):
        gc.stateless(3)  # type: ignore[arg-type]
    # Declared an update rule, chain's order checks see it.
    stateless_rule = gc.stateless(double, "my_rule")
    rule = gc.GradientTransformation(stateless_rule.init,
                                     gc.mark_update_rule(stateless_rule.update))
    assert gc.is_update_rule(rule) and not gc.is_update_rule(tx)
    with pytest.raises(ValueError, match="two update rules"):
        gc.chain(rule, gc.sgd(0.1))


@pytest.mark.parametrize("make", [gc.centralize, gc.set_to_zero,
                                  lambda: gc.clip_by_block_rms(1.0), gc.scale_by_trust_ratio,
                                  lambda: gc.adaptive_grad_clip(0.1)])
def test_every_stateless_builtin_refuses_another_state(make: Any) -> None:
    tx = make()
    params = {"w": torch.ones(2, 2)}
    with pytest.raises(TypeError, match=r"\.update: state must be the EmptyState"):
        tx.update({"w": torch.ones(2, 2)}, gc.clip_by_norm(1.0).init(params), params)


def test_chain_without_members_is_identity():
    tx = gc.chain()
    assert tx.init(PARAMS) == ()
    g = _grads(0)
    out, state = tx.update(g, (), PARAMS, flush=True)
    assert out is g and state == ()
    assert not gc.is_gate(tx)
    assert bool(gc.applied(state))


def test_chain_passes_extras_to_all_members_and_builtins_ignore_unknown_ones():
    log: list[dict[str, Any]] = []
    tx = gc.chain(
        _recorder(log),
        gc.loss_scale(init_scale=1.0),  # first: the others see unscaled gradients
        gc.clip_by_norm(1.0),
        gc.skip_if_nonfinite(),
        gc.accumulate_every(1),
        gc.clip_by_value(1.0),
        gc.adamw(1e-3),
        _recorder(log),
    )
    state = tx.init(PARAMS)
    out, state = tx.update(_grads(0), state, PARAMS, my_flag="x", flush=False, step=3)
    assert len(log) == 2
    for extra in log:
        assert extra["my_flag"] == "x" and extra["flush"] is False and extra["step"] == 3
    assert log[0]["gate_open"] is None  # nothing before the first member
    assert bool(gc.applied(state))
    # The same call without extras gives the same result.
    out2, _ = tx.update(_grads(0), tx.init(PARAMS), PARAMS)
    assert_tree_equal(out, out2)


@pytest.mark.parametrize(
    "make",
    [
        gc.identity,
        lambda: gc.clip_by_norm(1.0),
        lambda: gc.clip_by_value(1.0),
        lambda: gc.accumulate_every(2),
        gc.skip_if_nonfinite,
        gc.loss_scale,
        lambda: gc.sgd(0.1, momentum=0.9),
        lambda: gc.adam(1e-3),
        lambda: gc.adamw(1e-3),
        lambda: gc.chain(gc.skip_if_nonfinite(), gc.sgd(0.1)),
    ],
)
def test_every_builtin_accepts_unknown_extras(make):
    tx = make()
    state = tx.init(PARAMS)
    a, sa = tx.update(_grads(1), state, PARAMS, unknown_kwarg=object(), another=5)
    b, sb = tx.update(_grads(1), state, PARAMS)
    assert_tree_equal(a, b)
    assert_tree_equal(sa, sb)


def test_chain_validates_members_and_state():
    with pytest.raises(TypeError, match="argument 1"):
        gc.chain(gc.identity(), 3)
    with pytest.raises(TypeError, match="GradientTransformation"):
        gc.chain(lambda g: g)
    tx = gc.chain(gc.identity(), gc.clip_by_norm(1.0))
    with pytest.raises(ValueError, match=r"one state per member, 2 \(\[0\] identity; "
                                         r"\[1\] clip_by_norm\), got a tuple of 1"):
        tx.update(_grads(0), (gc.EmptyState(),), PARAMS)
    with pytest.raises(ValueError, match="tuple of member states made by this chain's init, 2"):
        tx.update(_grads(0), gc.EmptyState(), PARAMS)


def test_chain_applies_in_order():
    tx = gc.chain(gc.clip_by_value(0.1), gc.clip_by_norm(1e-3))
    g = {"w": torch.tensor([5.0, -5.0])}
    out, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(
        out["w"], torch.tensor([1.0, -1.0]) * 1e-3 / (2**0.5), rtol=1e-4, atol=0
    )
    tx = gc.chain(gc.clip_by_norm(1e-3), gc.clip_by_value(0.1))
    out, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(
        out["w"], torch.tensor([1.0, -1.0]) * 1e-3 / (2**0.5), rtol=1e-4, atol=0
    )
    tx = gc.chain(gc.clip_by_norm(10.0), gc.clip_by_value(0.1))
    out, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(out["w"], torch.tensor([0.1, -0.1]))


# --------------------------------------------------------------------------- associativity
def _members(kind):
    if kind == "plain":
        return [
            lambda: gc.clip_by_value(1.5),
            lambda: gc.clip_by_norm(2.0),
            lambda: gc.sgd(0.1, momentum=0.9),
            lambda: gc.clip_by_value(0.05),
        ]
    return [
        lambda: gc.loss_scale(init_scale=4.0, growth_interval=2),
        lambda: gc.clip_by_norm(2.0),
        lambda: gc.accumulate_every(2),
        lambda: gc.skip_if_nonfinite(),
        lambda: gc.adam(1e-2),
    ]


def _groupings(ms):
    a, b, c, *rest = ms
    yield gc.chain(*(m() for m in ms))
    yield gc.chain(gc.chain(a(), b()), gc.chain(c(), *(m() for m in rest)))
    yield gc.chain(a(), gc.chain(b(), gc.chain(c(), *(m() for m in rest))))
    yield gc.chain(gc.chain(gc.chain(a(), b(), c()), *(m() for m in rest)))
    yield gc.chain(a(), gc.chain(b()), gc.chain(), gc.chain(c(), gc.chain(*(m() for m in rest))))


@pytest.mark.parametrize("kind", ["plain", "gates"])
def test_nested_chains_behave_like_flat_ones(kind):
    txs = list(_groupings(_members(kind)))
    steps = [_grads(i, bad=NAN if i in (2, 5) else (INF if i == 6 else None)) for i in range(9)]
    states = [tx.init(PARAMS) for tx in txs]
    for g in steps:
        results = [tx.update(g, s, PARAMS) for tx, s in zip(txs, states)]
        states = [s for _, s in results]
        ref_u, ref_s = results[0]
        for u, s in results[1:]:
            assert_tree_equal(u, ref_u)
            # Same state leaves in the same order, only the tuple nesting differs.
            ref_leaves = [x for x in leaves(ref_s) if isinstance(x, torch.Tensor)]
            got_leaves = [x for x in leaves(s) if isinstance(x, torch.Tensor)]
            assert len(ref_leaves) == len(got_leaves)
            for x, y in zip(ref_leaves, got_leaves):
                assert_tree_equal(x, y)
            assert bool(gc.applied(s)) == bool(gc.applied(ref_s))
    assert gc.is_gate(txs[1]) == (kind == "gates")


# --------------------------------------------------------------------------- gates in chains
def test_applied_is_a_0dim_bool_tensor():
    state = gc.chain(gc.clip_by_norm(1.0), gc.sgd(0.1)).init(PARAMS)
    flag = gc.applied(state)
    assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.dim() == 0
    assert bool(flag)
    tx = gc.skip_if_nonfinite()
    _, s = tx.update(_grads(0, bad=NAN), tx.init(PARAMS))
    flag = gc.applied(s)
    assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and not bool(flag)


def test_skip_then_accumulate_window_with_one_valid_micro_step_is_applied():
    tx = gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2), gc.sgd(1.0, momentum=0.5))
    state = tx.init(PARAMS)
    g_ok = _grads(1)
    _, state = tx.update(g_ok, state, PARAMS)
    assert not bool(gc.applied(state))
    out, state = tx.update(_grads(2, bad=NAN), state, PARAMS)
    assert bool(gc.applied(state))  # the window held one valid micro-step
    assert_tree_close(out, {k: -v for k, v in g_ok.items()}, rtol=0, atol=0)
    # Invalid first, valid second: also applied.
    _, state = tx.update(_grads(3, bad=INF), state, PARAMS)
    assert not bool(gc.applied(state))
    out, state = tx.update(g_ok, state, PARAMS)
    assert bool(gc.applied(state))
    # Both invalid: not applied, zeros, the tail keeps its state.
    tail = clone_tree(state[2])
    _, state = tx.update(_grads(4, bad=NAN), state, PARAMS)
    out, state = tx.update(_grads(5, bad=NAN), state, PARAMS)
    assert not bool(gc.applied(state)) and _zero(out)
    assert_tree_equal(state[2], tail)


def test_accumulate_then_skip_drops_a_window_with_a_nonfinite_micro_step():
    tx = gc.chain(gc.accumulate_every(2), gc.skip_if_nonfinite(), gc.adam(1e-2))
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(1), state, PARAMS)
    tail = clone_tree(state[2])
    out, state = tx.update(_grads(2, bad=NAN), state, PARAMS)
    assert not bool(gc.applied(state)) and _zero(out)
    assert_tree_equal(state[2], tail)
    assert int(state[1].total_skips) == 1
    # The next clean window is applied with the mean of its micro-steps.
    _, state = tx.update(_grads(3), state, PARAMS)
    assert int(state[1].total_skips) == 1  # the closed micro-step did not reach skip
    out, state = tx.update(_grads(4), state, PARAMS)
    assert bool(gc.applied(state)) and not _zero(out)
    assert int(gc.tree_get(state[2], "count")) == 1


def test_loss_scale_then_accumulate_then_tail():
    tx = gc.chain(gc.loss_scale(init_scale=8.0), gc.accumulate_every(2), gc.sgd(1.0))
    params = {k: v.double() for k, v in PARAMS.items()}
    state = tx.init(params)
    g1, g2 = _grads(1, dtype=torch.float64), _grads(2, dtype=torch.float64)
    _, state = tx.update({k: v * 8 for k, v in g1.items()}, state, params)
    bad = {k: v * 8 for k, v in g2.items()}
    bad["w"][0, 0] = INF
    out, state = tx.update(bad, state, params)
    assert bool(gc.applied(state))  # g1 was valid
    assert_tree_close(out, {k: -v for k, v in g1.items()}, rtol=1e-15, atol=0)
    assert float(state[0].scale) == 4.0


def test_chain_of_only_closed_gates_emits_zeros_and_later_gates_keep_their_state():
    # (skip_if_nonfinite before loss_scale is refused: the scale would never back off)
    tx = gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2))
    state = tx.init(PARAMS)
    out, state = tx.update(_grads(0, bad=NAN), state, PARAMS)
    assert _zero(out) and not bool(gc.applied(state))
    # accumulate_every counts the call but took nothing in (it drops closed micro-steps)
    assert int(state[1].accumulated) == 0
    out, state = tx.update(_grads(1), state, PARAMS)
    assert bool(gc.applied(state))
    assert_tree_equal(out, _grads(1))  # the mean over the one micro-step it held


def test_custom_gate_with_public_helpers():
    @gc.gate_state()
    class EveryOtherState(NamedTuple):
        calls: torch.Tensor
        is_open: torch.Tensor

    def init(params):
        return EveryOtherState(torch.zeros((), dtype=torch.int64), torch.tensor(False))

    def update(updates, state, params=None, gate_open=None, **extra):
        calls = state.calls + 1
        is_open = calls % 2 == 0
        out = {k: torch.where(is_open, v, torch.zeros_like(v)) for k, v in updates.items()}
        return out, EveryOtherState(calls, is_open)

    gate = gc.GradientTransformation(init, gc.mark_gate(update))
    assert gc.is_gate(gate)
    tx = gc.chain(gate, gc.sgd(0.1, momentum=0.9))
    state = tx.init(PARAMS)
    counts = []
    for i in range(6):
        out, state = tx.update(_grads(i), state, PARAMS)
        assert bool(gc.applied(state)) == (i % 2 == 1)
        assert _zero(out) == (i % 2 == 0)
        counts.append(int(state[1][0].count))
    assert counts == [0, 1, 1, 2, 2, 3]
    with pytest.raises(TypeError, match="no field"):
        gc.gate_state(flags=("missing",))(EveryOtherState)


# --------------------------------------------------------------------------- apply_updates
def test_apply_updates_casts_and_passes_none_through():
    params = {
        "h": torch.ones(3, dtype=torch.float16),
        "f": torch.ones(2),
        "d": torch.ones(2, dtype=torch.float64),
        "n": torch.full((2,), 7.0),
    }
    updates = {
        "h": torch.full((3,), 1e-3),  # float32 update for a float16 param
        "f": torch.full((2,), 0.5, dtype=torch.float64),
        "d": torch.full((2,), 0.25, dtype=torch.float64),
        "n": None,
    }
    before = clone_tree(params)
    ub = clone_tree(updates)
    new = gc.apply_updates(params, updates)
    assert_tree_equal(params, before)
    assert_tree_equal(updates, ub)
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in params.items()}
    assert torch.equal(new["h"], (torch.ones(3) + 1e-3).half())
    assert torch.equal(new["f"], torch.full((2,), 1.5))
    assert torch.equal(new["d"], torch.full((2,), 1.25, dtype=torch.float64))
    assert new["n"] is params["n"]
    # None params stay None
    assert gc.apply_updates({"a": None}, {"a": None}) == {"a": None}
    with pytest.raises(ValueError, match="structure"):
        gc.apply_updates(params, {"h": updates["h"]})


def test_apply_updates_in_place():
    model = torch.nn.Linear(3, 2).half()
    extra = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    params = {"weight": model.weight, "bias": model.bias, "x": extra}
    w0, b0, x0 = model.weight.detach().clone(), model.bias.detach().clone(), extra.detach().clone()
    ptr = model.weight.data_ptr()
    updates = {"weight": torch.full((2, 3), 0.5), "bias": None, "x": torch.full((2,), 0.5)}
    ret = gc.apply_updates_(params, updates)
    assert ret is params
    assert model.weight.data_ptr() == ptr and model.weight.dtype == torch.float16
    assert torch.equal(model.weight.detach(), (w0.float() + 0.5).half())
    assert torch.equal(model.bias.detach(), b0)
    assert torch.equal(extra.detach(), x0 + 0.5)
    assert model.weight.grad is None and model.weight.requires_grad
    with pytest.raises(ValueError, match="structure"):
        gc.apply_updates_(params, [updates["weight"]])


@pytest.mark.parametrize(
    "p_dtype, u_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_apply_updates_in_place_equals_the_pure_version(p_dtype, u_dtype):
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(1000, generator=gen).to(p_dtype), "b": torch.randn(()).to(p_dtype)}
    updates = {
        k: torch.randn(v.shape, generator=gen, dtype=u_dtype) * 1e-3 for k, v in params.items()
    }
    pure = gc.apply_updates(params, updates)
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    gc.apply_updates_(live, updates)
    for k in params:
        assert live[k].dtype == p_dtype
        assert torch.equal(live[k].detach(), pure[k])  # one rounding, in both


# --------------------------------------------------------------------------- properties
@given(grad_sequences(steps=4, nonfinite=True))
def test_property_chain_of_gates_and_clipping(steps):
    tx = gc.chain(
        gc.loss_scale(init_scale=2.0, growth_interval=1),
        gc.skip_if_nonfinite(),
        gc.clip_by_norm(1.0),
        gc.accumulate_every(2),
        gc.clip_by_value(0.3),
    )
    for out, _ in check_protocol(tx, steps):
        for o in out.values():
            if o is not None:
                assert bool(torch.isfinite(o).all())
                assert bool((o.abs() <= 0.3).all())


@given(grad_sequences(steps=3))
def test_property_chain_is_the_composition_of_its_members(steps):
    a, b = gc.clip_by_norm(0.7), gc.clip_by_value(0.2)
    tx = gc.chain(a, b)
    results = check_protocol(tx, steps)
    for g, (out, _) in zip(steps, results):
        u1, _ = a.update(g, a.init(g))
        u2, _ = b.update(u1, b.init(u1))
        assert_tree_equal(out, u2)


# --------------------------------------------------------------------------- compile / vmap / grad
def _mixed_chain():
    return gc.chain(
        gc.loss_scale(init_scale=4.0, growth_interval=2),
        gc.skip_if_nonfinite(),
        gc.clip_by_norm(1.0),
        gc.clip_by_value(0.4),
        gc.accumulate_every(2),
        gc.adamw(1e-2, weight_decay=0.1),
    )


def test_compiled_mixed_chain_matches_eager():
    torch._dynamo.reset()
    tx = _mixed_chain()
    compiled = torch.compile(tx.update, fullgraph=True)
    steps = [_grads(i, bad=NAN if i in (2, 5) else None) for i in range(7)]
    assert_compiled_matches_eager(compiled, tx, PARAMS, steps)


def test_vmap_mixed_chain_matches_a_loop():
    tx = _mixed_chain()
    params_list = [{k: v + 0.1 * i for k, v in PARAMS.items()} for i in range(4)]
    steps = [
        [_grads(10 * t + i, bad=INF if (t + i) % 4 == 1 else None) for i in range(4)]
        for t in range(5)
    ]
    assert_vmap_matches_loop(tx, params_list, steps)


def test_gradients_flow_through_a_chain_in_pure_mode():
    tx = gc.chain(gc.loss_scale(init_scale=2.0), gc.clip_by_norm(0.5), gc.sgd(0.3, momentum=0.9))
    params = {k: v.double() + 1 for k, v in PARAMS.items()}
    gb = _grads(7, dtype=torch.float64)["b"] * 4

    def loss_of_grad(gw):
        updates, _ = tx.update({"w": gw, "b": gb}, tx.init(params), params)
        new = gc.apply_updates(params, updates)
        return (new["w"] ** 2).sum() + new["b"].exp().sum()

    gw = (_grads(8, dtype=torch.float64)["w"] * 4).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of_grad(gw), gw)
    assert bool((grad != 0).any())
    assert torch.autograd.gradcheck(loss_of_grad, (gw,))
