"""Every built-in transformation obeys every law of gradchain.testing, and the
transformation-specific properties of clipping and the gates hold on drawn examples.

The laws run with the project's hypothesis profile (tests/conftest.py: fixed seed and
bounded examples under CI=true). The compile law compiles each transformation once, on
one tree of mixed dtypes, and reuses the graph for its examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradchain as gc
from gradchain.testing import check_transformation
from gradchain.testing import strategies as gst
from gradchain.tree import flatten


def _ab(tree: Any) -> Any:
    return optree.tree_map(
        lambda m: "a" if m else "b", gst.every_other_leaf(tree), none_is_leaf=True
    )


BUILTINS: dict[str, Callable[[], gc.GradientTransformation]] = {
    "identity": lambda: gc.identity(),
    "clip_by_norm": lambda: gc.clip_by_norm(1.0),
    "clip_by_norm(inf)": lambda: gc.clip_by_norm(0.5, norm_type="inf"),
    "clip_by_norm(p=1, error_if_nonfinite)": lambda: gc.clip_by_norm(
        2.0, norm_type=1.0, error_if_nonfinite=True
    ),
    "clip_by_value": lambda: gc.clip_by_value(0.5),
    "clip_by_value(min_value=0)": lambda: gc.clip_by_value(1.0, min_value=0.0),
    "accumulate_every(2)": lambda: gc.accumulate_every(2),
    "accumulate_every(3, sum)": lambda: gc.accumulate_every(3, mean=False),
    "skip_if_nonfinite": lambda: gc.skip_if_nonfinite(),
    "loss_scale": lambda: gc.loss_scale(init_scale=8.0, growth_interval=2),
    "loss_scale(static)": lambda: gc.loss_scale(init_scale=4.0, dynamic=False),
    "loss_scale(min_scale)": lambda: gc.loss_scale(
        init_scale=2.0, growth_interval=1, min_scale=1.0
    ),
    "scale": lambda: gc.scale(-0.5),
    "scale_by_learning_rate": lambda: gc.scale_by_learning_rate(0.1),
    "scale_by_learning_rate(schedule)": lambda: gc.scale_by_learning_rate(
        gc.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=2, decay_steps=10)
    ),
    "scale_by_adam": lambda: gc.scale_by_adam(),
    "scale_by_adam(amsgrad)": lambda: gc.scale_by_adam(amsgrad=True),
    "trace": lambda: gc.trace(0.9),
    "trace(nesterov)": lambda: gc.trace(0.9, nesterov=True),
    "add_decayed_weights": lambda: gc.add_decayed_weights(0.1),
    "sgd": lambda: gc.sgd(0.1),
    "sgd(momentum, dampening, weight_decay)": lambda: gc.sgd(
        0.1, momentum=0.9, dampening=0.1, weight_decay=0.01
    ),
    "sgd(nesterov, maximize)": lambda: gc.sgd(0.1, momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda: gc.adam(1e-3),
    "adam(amsgrad, weight_decay, maximize)": lambda: gc.adam(
        1e-3, amsgrad=True, weight_decay=0.01, maximize=True
    ),
    "adamw": lambda: gc.adamw(1e-3),
    "adamw(schedule)": lambda: gc.adamw(gc.linear_schedule(1e-3, 0.0, 10)),
    "masked": lambda: gc.masked(gc.adam(1e-3), gst.every_other_leaf),
    "masked(gate)": lambda: gc.masked(
        gc.chain(gc.skip_if_nonfinite(), gc.sgd(0.1, momentum=0.9)), gst.every_other_leaf
    ),
    "partition": lambda: gc.partition(
        {"a": gc.chain(gc.clip_by_norm(1.0), gc.sgd(0.1, momentum=0.9)), "b": gc.adamw(1e-3)},
        _ab,
    ),
    "partition(gate)": lambda: gc.partition(
        {"a": gc.chain(gc.accumulate_every(2), gc.adam(1e-3)), "b": gc.sgd(0.1)}, _ab
    ),
    "chain(skip, clip, accumulate, adamw)": lambda: gc.chain(
        gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.accumulate_every(2), gc.adamw(1e-3)
    ),
    "chain(loss_scale, clip_by_value, sgd)": lambda: gc.chain(
        gc.loss_scale(init_scale=8.0, growth_interval=2),
        gc.clip_by_value(1.0),
        gc.sgd(0.1, momentum=0.9),
    ),
    "skip_if_nonfinite(max_consecutive_errors)": lambda: gc.skip_if_nonfinite(
        max_consecutive_errors=100
    ),
    "accumulate_every(schedule)": lambda: gc.accumulate_every(
        lambda w: torch.where(w < 1, 1, 2)
    ),
    "adamw(mask)": lambda: gc.adamw(1e-3, weight_decay=0.1, mask=gst.every_other_leaf),
    "named_chain(skip, clip, adamw)": lambda: gc.named_chain(
        ("skip", gc.skip_if_nonfinite()), ("clip", gc.clip_by_norm(1.0)), ("opt", gc.adamw(1e-3))
    ),
    "inject_hyperparams(adamw)": lambda: gc.inject_hyperparams(gc.adamw)(
        lr=1e-3, weight_decay=0.1
    ),
    "inject_hyperparams(sgd, schedule)": lambda: gc.inject_hyperparams(
        gc.sgd, static_args=("momentum",)
    )(lr=gc.linear_schedule(0.1, 0.0, 10), momentum=0.9),
    "chain(accumulate, loss_scale, clip, adam)": lambda: gc.chain(
        gc.accumulate_every(2),
        gc.loss_scale(init_scale=8.0),
        gc.clip_by_norm(1.0),
        gc.adam(1e-3),
    ),
}


# Chain-law partners: every built-in (two accumulations in one chain included, see
# test_two_accumulations_in_a_chain below).
PARTNERS = gst.transformations(combinators=False)


# The law that cannot hold, and why: skip_if_nonfinite(max_consecutive_errors=N) gives up
# by raising, which vmap cannot express per member, so it refuses a batched state (tested
# in tests/test_gates.py).
NO_VMAP = {"skip_if_nonfinite(max_consecutive_errors)"}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_obeys_every_law(name: str) -> None:
    check_transformation(
        BUILTINS[name](),
        vmap=name not in NO_VMAP,
        chain_laws=True,
        chain_partners=PARTNERS,
        compile=True,
        compile_examples=2,
    )


def test_two_accumulations_in_a_chain() -> None:
    # Found by the laws: a second window behind a closed first one must not count the call,
    # in eager mode (the chain does not call it) and compiled (it keeps its state).
    for tx in (
        gc.chain(gc.accumulate_every(2), gc.accumulate_every(2)),
        gc.chain(gc.chain(gc.accumulate_every(2), gc.accumulate_every(2)), gc.sgd(0.1, momentum=0.9)),
    ):
        params = {"w": torch.zeros(1)}
        compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
        eager_state, compiled_state = tx.init(params), tx.init(params)
        applied = []
        for g in [1.0, 2.0, 3.0, 4.0, 5.0]:
            u, eager_state = tx.update({"w": torch.tensor([g])}, eager_state, params)
            c, compiled_state = compiled({"w": torch.tensor([g])}, compiled_state, params)
            assert torch.equal(u["w"], c["w"])
            for a, b in zip(
                optree.tree_leaves(eager_state), optree.tree_leaves(compiled_state)
            ):
                assert torch.equal(a, b)
            assert bool(gc.applied(compiled_state)) == bool(gc.applied(eager_state))
            applied.append(bool(gc.applied(eager_state)))
            if not applied[-1]:
                assert torch.equal(u["w"], torch.zeros(1))
        assert applied == [False, False, False, True, False]


@pytest.mark.parametrize("kind", ["partition", "masked"])
def test_weight_decay_in_an_empty_subset(kind: str) -> None:
    # Found by the laws: with a bare tensor as params, a member whose subset is empty gets
    # params=None, on which add_decayed_weights used to raise.
    if kind == "partition":
        tx = gc.partition({"a": gc.sgd(0.1), "b": gc.adamw(1e-3)}, lambda p: "a")
    else:
        tx = gc.masked(gc.adamw(1e-3), lambda p: False)
    params = torch.zeros(2)
    updates, _ = tx.update(torch.ones(2), tx.init(params), params)
    assert updates.shape == (2,)


def test_random_chains_of_builtins_obey_the_eager_laws() -> None:
    check_transformation(gst.transformations(max_depth=2), max_examples=30)


# --------------------------------------------------------------------------- properties
def _present(tree: Any) -> list[torch.Tensor]:
    return [x for x in flatten(tree)[0] if x is not None]


def _norm64(ts: list[torch.Tensor], p: float) -> float:
    if not ts:
        return 0.0
    flat = torch.cat([t.double().reshape(-1) for t in ts])
    return float(torch.linalg.vector_norm(flat, p)) if flat.numel() else 0.0


def _eps(ts: list[torch.Tensor]) -> float:
    return max((torch.finfo(t.dtype).eps for t in ts), default=0.0)


@st.composite
def _params_and_grads(draw: st.DrawFn, nonfinite: bool = False, extremes: bool = True) -> Any:
    params = draw(gst.params())
    grads = draw(gst.gradients(params, nonfinite=nonfinite, extremes=extremes))
    return params, grads


@given(
    _params_and_grads(),
    st.sampled_from([0.5, 1.0, 10.0]),
    st.sampled_from([2.0, 1.0, math.inf, 3.5]),
)
def test_clip_by_norm_bounds_norm_keeps_direction_and_is_identity_below(
    pg: Any, max_norm: float, p: float
) -> None:
    params, grads = pg
    tx = gc.clip_by_norm(max_norm, norm_type=p)
    out, state = tx.update(grads, tx.init(params), params)
    gs, us = _present(grads), _present(out)
    norm = float(state.norm)
    if not math.isfinite(norm):
        return  # inf norm: torch's coefficient is 0 (or nan); covered by parity tests
    slack = 4 * _eps(gs)
    assert _norm64(us, p) <= max_norm * (1 + slack) + 1e-6
    if norm + 1e-6 <= max_norm:
        for g, u in zip(gs, us):
            assert torch.equal(g, u)
        return
    coef = max_norm / (norm + 1e-6)
    for g, u in zip(gs, us):
        # Same direction: one non-negative coefficient for every leaf.
        expected = (g.double() * coef).to(g.dtype).double()
        tol = 4 * torch.finfo(g.dtype).eps * expected.abs() + torch.finfo(g.dtype).tiny
        assert bool(((u.double() - expected).abs() <= tol).all())


@given(_params_and_grads(nonfinite=True), st.sampled_from([(1.0, None), (0.5, 0.0), (2.0, -3.0)]))
def test_clip_by_value_is_bounded_and_idempotent(pg: Any, bounds: tuple[float, Any]) -> None:
    params, grads = pg
    hi, lo = bounds
    lo_v = -hi if lo is None else lo
    tx = gc.clip_by_value(hi, min_value=lo)
    once, state = tx.update(grads, tx.init(params), params)
    twice, _ = tx.update(once, state, params)
    for u, v in zip(_present(once), _present(twice)):
        finite = ~u.isnan()
        assert bool((u[finite] <= hi).all()) and bool((u[finite] >= lo_v).all())
        assert torch.equal(u.isnan(), v.isnan()) and torch.equal(u[finite], v[finite])


@given(gst.params(), st.integers(1, 4), st.data())
def test_accumulate_every_emits_the_window_mean(params: Any, n: int, data: st.DataObject) -> None:
    tx = gc.accumulate_every(n)
    state = tx.init(params)
    window = [data.draw(gst.gradients(params, none=False, extremes=False)) for _ in range(n)]
    for i, g in enumerate(window, 1):
        out, state = tx.update(g, state, params)
        if i < n:
            assert all(bool((u == 0).all()) for u in _present(out))
            assert not bool(gc.applied(state))
    assert bool(gc.applied(state))
    for k, u in enumerate(_present(out)):
        stack = torch.stack([_present(g)[k].double() for g in window])
        expected = stack.mean(0)
        tol = 8 * torch.finfo(u.dtype).eps * stack.abs().max(0).values + 1e-30 if u.numel() else 0
        assert bool(((u.double() - expected).abs() <= tol).all())


# Tails without accumulate_every: by design (see its docstring) an accumulation window
# counts the calls an earlier gate dropped, so its position advances on a skipped step.
_TAILS = {
    "sgd(momentum)": lambda: gc.sgd(0.1, momentum=0.9),
    "clip, adamw": lambda: gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-3)),
    "clip_by_value, adam(amsgrad)": lambda: gc.chain(
        gc.clip_by_value(1.0), gc.adam(1e-3, amsgrad=True)
    ),
    # a gate in the tail (loss_scale there is refused: the skip would hide its overflows)
    "skip, sgd": lambda: gc.chain(gc.skip_if_nonfinite(), gc.sgd(0.1)),
}


@given(gst.params(), st.data(), st.sampled_from(sorted(_TAILS)))
def test_skip_leaves_the_tail_state_bit_identical(
    params: Any, data: st.DataObject, tail_name: str
) -> None:
    tail = _TAILS[tail_name]()
    tx = gc.chain(gc.skip_if_nonfinite(), tail)
    ref_state = tail.init(params)
    state = tx.init(params)
    for _ in range(3):
        g = data.draw(gst.gradients(params, nonfinite=True))
        before = state[1]
        out, state = tx.update(g, state, params)
        finite = all(bool(t.isfinite().all()) for t in _present(g))
        if finite:
            ref_out, ref_state = tail.update(g, ref_state, params)
            assert optree.tree_all(
                optree.tree_map(
                    lambda a, b: a is b or (a is not None and torch.equal(a, b)),
                    out,
                    ref_out,
                    none_is_leaf=True,
                )
            )
        else:
            assert all(bool((u == 0).all()) for u in _present(out))
            same = optree.tree_map(
                lambda a, b: (
                    a is b
                    or (
                        a is not None
                        and a.shape == b.shape
                        and torch.equal(a, b)
                        and a.dtype == b.dtype
                    )
                ),
                before,
                state[1],
                none_is_leaf=True,
            )
            assert optree.tree_all(same), "a skipped step changed the tail's state"


@given(_params_and_grads(extremes=True), st.integers(-30, 30))
def test_loss_scale_unscaling_is_exact_for_powers_of_two(pg: Any, k: int) -> None:
    params, grads = pg
    tx = gc.loss_scale(init_scale=2.0**k)
    out, state = tx.update(grads, tx.init(params), params)
    expected = [(g.double() * 2.0**-k).to(g.dtype) for g in _present(grads)]
    if all(bool(e.isfinite().all()) for e in expected):
        assert bool(gc.applied(state))
        for u, e in zip(_present(out), expected):
            assert u.dtype == e.dtype and torch.equal(u, e)
    else:
        assert not bool(gc.applied(state))


_GATES = {
    "skip_if_nonfinite": lambda: gc.skip_if_nonfinite(),
    "loss_scale": lambda: gc.loss_scale(init_scale=2.0**-3, growth_interval=1),
    "accumulate, skip": lambda: gc.chain(gc.accumulate_every(2), gc.skip_if_nonfinite()),
    "accumulate, loss_scale": lambda: gc.chain(gc.accumulate_every(2), gc.loss_scale(8.0)),
    "skip, accumulate": lambda: gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2)),
}


@given(gst.params(), st.data(), st.sampled_from(sorted(_GATES)))
def test_gates_never_emit_nonfinite_values(params: Any, data: st.DataObject, name: str) -> None:
    tx = _GATES[name]()
    state = tx.init(params)
    for _ in range(3):
        # Huge values only where accumulating them cannot overflow the accumulator.
        g = data.draw(gst.gradients(params, nonfinite=True, extremes=name != "skip, accumulate"))
        out, state = tx.update(g, state, params)
        for u in _present(out):
            assert bool(u.isfinite().all()), f"{name} emitted {u}"
