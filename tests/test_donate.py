"""``donate=True`` / ``donate="updates"``: the same results, bit for bit, as the pure call,
computed in the donated memory."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch

import gradchain as gc
from gradchain.tree import global_norm


def _params() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "d": torch.randn(4, generator=g, dtype=torch.float64),
        "h": torch.randn(6, generator=g).half(),
        "none": None,
    }


def _grads(step: int, params: dict[str, Any], bad: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 + step)
    out = {
        k: None if p is None else (torch.randn(p.shape, generator=g) * 3).to(p.dtype)
        for k, p in params.items()
    }
    if bad:
        out["w"][1, 2] = math.nan if step % 2 else math.inf
    return out


def _clone(tree: Any) -> Any:
    return optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def _same(a: Any, b: Any) -> bool:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(
                torch.nan_to_num(x.double(), nan=12345.0), torch.nan_to_num(y.double(), nan=12345.0)
            ) and bool((x.isnan() == y.isnan()).all())):
                return False
        elif x != y:
            return False
    return True


CASES: dict[str, Callable[[], gc.GradientTransformation]] = {
    "clip_by_norm": lambda: gc.clip_by_norm(1.0),
    "clip_by_norm_inf": lambda: gc.clip_by_norm(0.5, norm_type="inf"),
    "clip_by_value": lambda: gc.clip_by_value(0.7),
    "scale": lambda: gc.scale(-0.3),
    "scale_by_lr_schedule": lambda: gc.scale_by_learning_rate(gc.linear_schedule(0.1, 0.01, 4)),
    "add_decayed_weights": lambda: gc.add_decayed_weights(0.1),
    "scale_by_adam": lambda: gc.scale_by_adam(),
    "scale_by_adam_amsgrad": lambda: gc.scale_by_adam(amsgrad=True),
    "trace": lambda: gc.trace(0.9),
    "trace_dampening": lambda: gc.trace(0.9, dampening=0.3),
    "trace_nesterov": lambda: gc.trace(0.9, nesterov=True),
    "sgd_momentum": lambda: gc.sgd(0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda: gc.adam(1e-2, weight_decay=0.1),
    "adamw": lambda: gc.adamw(1e-2),
    "accumulate_mean": lambda: gc.accumulate_every(3),
    "accumulate_sum": lambda: gc.accumulate_every(2, mean=False),
    "skip_if_nonfinite": lambda: gc.skip_if_nonfinite(),
    "loss_scale": lambda: gc.loss_scale(init_scale=4.0, growth_interval=2),
    "amp_chain": lambda: gc.chain(
        gc.loss_scale(init_scale=8.0, growth_interval=3),
        gc.clip_by_norm(1.0),
        gc.accumulate_every(2),
        gc.adamw(1e-2),
    ),
    "window_chain": lambda: gc.chain(
        gc.accumulate_every(2), gc.skip_if_nonfinite(), gc.clip_by_norm(2.0), gc.adam(1e-2)
    ),
    "trace_then_scale": lambda: gc.chain(gc.trace(0.9), gc.scale_by_learning_rate(0.1)),
    "masked": lambda: gc.chain(
        gc.skip_if_nonfinite(),
        gc.masked(gc.clip_by_value(0.1), lambda p: optree.tree_map(
            lambda x: x is not None and x.ndim == 2, p, none_is_leaf=True)),
        gc.sgd(0.1, momentum=0.5),
    ),
}


@pytest.mark.parametrize("donate", [True, "updates"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_donated_update_equals_pure_update(name: str, donate: bool | str) -> None:
    tx = CASES[name]()
    params = _params()
    pure_state = tx.init(params)
    donated_state = _clone(pure_state)
    for step in range(7):
        grads = _grads(step, params, bad=step in (2, 5))
        pure_u, pure_state_next = tx.update(_clone(grads), pure_state, params)
        donated_u, donated_state = tx.update(_clone(grads), donated_state, params, donate=donate)
        assert _same(pure_u, donated_u), f"{name}: updates differ at step {step}"
        assert _same(pure_state_next, donated_state), f"{name}: state differs at step {step}"
        pure_state = pure_state_next


def test_pure_call_leaves_inputs_and_state_alone() -> None:
    tx = CASES["amp_chain"]()
    params = _params()
    state = tx.init(params)
    for step in range(4):
        grads = _grads(step, params, bad=step == 2)
        grads_before, state_before = _clone(grads), _clone(state)
        _, new_state = tx.update(grads, state, params)
        assert _same(grads, grads_before) and _same(state, state_before)
        state = new_state


def test_donation_reuses_the_memory() -> None:
    params = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    grads = {"w": torch.full((1000,), 3.0), "b": torch.full((10,), 4.0)}
    ptrs = {k: v.data_ptr() for k, v in grads.items()}
    out, _ = gc.clip_by_norm(1.0).update(grads, gc.clip_by_norm(1.0).init(params), donate=True)
    assert {k: v.data_ptr() for k, v in out.items()} == ptrs

    tx = gc.adamw(1e-3)
    state = tx.init(params)
    mu_ptr = gc.tree_get(state, "mu")["w"].data_ptr()
    grads = {"w": torch.ones(1000), "b": torch.ones(10)}
    g_ptr = grads["w"].data_ptr()
    out, state = tx.update(grads, state, params, donate=True)
    assert gc.tree_get(state, "mu")["w"].data_ptr() == mu_ptr  # moments updated in place
    assert out["w"].data_ptr() == g_ptr  # the direction written into the gradient memory

    acc = gc.accumulate_every(4)
    state = acc.init(params)
    sums_ptr = state.sums["w"].data_ptr()
    out, state = acc.update({"w": torch.ones(1000), "b": torch.ones(10)}, state, donate=True)
    assert state.sums["w"].data_ptr() == sums_ptr and bool((out["w"] == 0).all())


def test_donated_updates_never_alias_the_new_state() -> None:
    # trace's new buffer is its output in the pure call; donated, a later member writes
    # into the output, so it must be separate memory.
    tx = gc.chain(gc.trace(0.9), gc.scale(2.0))
    params = {"w": torch.zeros(3)}
    state = tx.init(params)
    out, state = tx.update({"w": torch.ones(3)}, state, params, donate=True)
    assert torch.equal(out["w"], torch.full((3,), 2.0))
    assert torch.equal(state[0].trace["w"], torch.ones(3))


def test_bad_donate_value_is_refused_naming_it() -> None:
    tx = gc.clip_by_norm(1.0)
    g = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="donate must be True, False, 'updates' or 'state'"):
        tx.update(g, tx.init(g), donate="yes")
    assert torch.equal(g["w"], torch.ones(2))


def test_adapter_fast_path_matches_transactional_path() -> None:
    def run(transactional: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = gc.ChainedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            gc.chain(gc.loss_scale(init_scale=16.0), gc.clip_by_norm(0.5), gc.accumulate_every(2)),
            transactional=transactional,
        )
        data = torch.randn(12, 8, 4, generator=torch.Generator().manual_seed(1))
        for i, x in enumerate(data):
            loss = model(x).pow(2).mean()
            if i == 5:
                loss = loss * math.inf
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_adapter_refuses_donate_as_step_argument() -> None:
    model = torch.nn.Linear(2, 1)
    opt = gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gc.clip_by_norm(1.0))
    model(torch.ones(1, 2)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="donate is not a step argument"):
        opt.step(donate=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def _remembers_last_updates() -> gc.GradientTransformation:
    """A user's transformation that keeps its output in its state and knows nothing of
    donation."""

    def init(params: Any) -> Any:
        return optree.tree_map(
            lambda p: None if p is None else torch.zeros_like(p), params, none_is_leaf=True
        )

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return updates, updates

    return gc.GradientTransformation(init, update)


@pytest.mark.parametrize("donate", [None, True, "updates"])
def test_a_member_after_an_unaware_one_gets_nothing_it_could_corrupt(donate: Any) -> None:
    # The unaware member's output is its state: the scale after it must not write into it,
    # whether the chain call is pure or donated, nested or flat.
    for tx in (
        gc.chain(gc.clip_by_norm(1.0), _remembers_last_updates(), gc.scale(-0.5)),
        gc.chain(gc.clip_by_norm(1.0), gc.chain(_remembers_last_updates(), gc.scale(-0.5))),
    ):
        params = {"w": torch.zeros(2)}
        state = tx.init(params)
        kwargs = {} if donate is None else {"donate": donate}
        out, state = tx.update({"w": torch.tensor([0.3, 0.4])}, state, params, **kwargs)
        remembered = state[1]["w"] if len(state) == 3 else state[1][0]["w"]
        assert torch.equal(remembered, torch.tensor([0.3, 0.4]))
        assert torch.equal(out["w"], torch.tensor([-0.15, -0.2]))


def _aliasing(kind: str) -> gc.GradientTransformation:
    """A user's transformation, unaware of donation, whose output shares memory with
    something the chain does not own, by another tensor object than the one held."""

    def init(params: Any) -> Any:
        return {"kept": optree.tree_map(torch.zeros_like, params)}

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        if kind == "view of its input":
            return {k: v.view(v.shape) for k, v in updates.items()}, state
        if kind == "view of the params":
            return {k: p.view(p.shape)
                    for k, p in params.items()}, state
        fresh = {k: v * 1.0 for k, v in updates.items()}
        if kind == "a view kept in its state":
            return fresh, {"kept": {k: v.view(v.shape) for k, v in fresh.items()}}
        assert kind == "one tensor in two leaves"
        first = fresh["a"]
        return {"a": first, "b": first}, state

    return gc.GradientTransformation(init, update)


@pytest.mark.parametrize(
    "kind",
    ["view of its input", "view of the params", "a view kept in its state",
     "one tensor in two leaves"],
)
def test_output_sharing_memory_by_another_tensor_is_not_taken_as_owned(kind: str) -> None:
    # The member after it (clip, in place when its input is owned) must leave the memory
    # alone: the caller's gradients and params, and the state it kept, stay as they were.
    tx = gc.chain(_aliasing(kind), gc.clip_by_norm(0.1))
    params = {"a": torch.full((3,), 2.0), "b": torch.full((3,), 2.0)}
    grads = {"a": torch.full((3,), 3.0), "b": torch.full((3,), 4.0)}
    params_before = {k: v.clone() for k, v in params.items()}
    versions = {k: g._version for k, g in grads.items()}
    out, state = tx.update(grads, tx.init(params), params)
    assert {k: g._version for k, g in grads.items()} == versions
    assert all(torch.equal(params[k], params_before[k]) for k in params)
    if kind == "a view kept in its state":
        assert torch.equal(state[0]["kept"]["a"], torch.full((3,), 3.0))
    if kind == "one tensor in two leaves":
        # Scaled once, not twice through the shared memory.
        assert torch.equal(out["a"], out["b"])
        norm = (2 * 3 * 9.0) ** 0.5
        assert torch.allclose(out["a"], torch.full((3,), 3.0 * 0.1 / (norm + 1e-6)))
    assert float(global_norm(list(out.values()))) <= 0.1 + 1e-6


@pytest.mark.parametrize("init_scale", [2.0**16, 3.0, 0.5])
def test_donated_loss_scale_one_pass_unscale_matches_the_pure_call(init_scale: float) -> None:
    """Donated float32 on CPU, the unscale and the finiteness check are one kernel pass
    when the inverse scale is at most 1; below a scale of 1 a finite gradient can overflow
    when unscaled, and the step must still be skipped exactly as in the pure call."""
    tx = gc.loss_scale(init_scale=init_scale, growth_interval=1)
    params = {"w": torch.zeros(6), "b": torch.zeros(3)}
    steps = [
        {"w": torch.linspace(-3, 3, 6) * init_scale, "b": torch.ones(3)},
        {"w": torch.full((6,), 3e38), "b": torch.ones(3)},  # overflows when scale < 1
        {"w": torch.tensor([1.0, math.nan, 0, 0, 0, 0]), "b": torch.ones(3)},
        {"w": torch.ones(6), "b": torch.full((3,), 7.0)},
    ]
    pure_s, don_s = tx.init(params), tx.init(params)
    for grads in steps:
        pure_u, pure_s = tx.update(grads, pure_s)
        don_u, don_s = tx.update(_clone(grads), don_s, donate=True)
        assert _same(pure_u, don_u) and _same(pure_s, don_s)
        assert all(bool(torch.isfinite(u).all()) for u in don_u.values())


def test_pure_chain_leaves_callers_empty_gradients_alone() -> None:
    """Empty tensors all have data pointer 0: ownership is decided by storage identity,
    so a pass-through empty gradient is never taken for memory the chain owns."""
    tx = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.scale(2.0))
    params = {"e": torch.zeros(2, 0), "w": torch.ones(3)}
    grads = {"e": torch.zeros(2, 0), "w": torch.full((3,), 4.0)}
    versions = {k: g._version for k, g in grads.items()}
    out, _ = tx.update(grads, tx.init(params), params)
    assert {k: g._version for k, g in grads.items()} == versions
    assert torch.allclose(out["w"], torch.full((3,), 2.0 / 3**0.5))


def test_closed_gate_zero_views_flow_through_later_members() -> None:
    """A gate closed on device data (here inside ``masked``) emits broadcast views of one
    0-dim zero (no memory). Members after it read them (a finiteness check's in-place
    kernel refuses them) and are never given them to write into."""
    inner = gc.chain(gc.skip_if_nonfinite(), gc.trace(0.9))  # (no rule: a gate follows)
    tx = gc.chain(gc.masked(inner, {"w": True, "v": True}), gc.identity(), gc.skip_if_nonfinite())
    params = {"w": torch.zeros(3, 3), "v": torch.zeros(2)}
    state = tx.init(params)
    for bad in (False, True):
        grads = {"w": torch.ones(3, 3), "v": torch.ones(2)}
        if bad:
            grads["w"][2, 2] = math.nan
        out, state = tx.update(grads, state, params)
    assert torch.equal(out["w"], torch.zeros(3, 3)) and not bool(gc.applied(state))
