"""``update_and_apply_``: the in-place step, fused with torch's Adam/AdamW kernels.

The fused path must give what ``torch.optim.Adam/AdamW(fused=True)`` gives on the same
inputs (bit for bit), keep the meaning of gates before the rule, and fall back to the
unfused in-place path (``update(donate=True)`` + ``apply_updates_``) wherever the kernel
does not fit, with the same results as that path.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import optree
import pytest
import torch

import gradchain as gc
from gradchain._tree import MISS, MetaMemo
from gradchain.optim._fused import fused_plan_of


def _params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=g).to(dtype),
        "b": torch.randn(3, generator=g).to(dtype),
        "e": torch.randn(7, generator=g).to(dtype),
    }


def _grads(step: int, params: dict[str, torch.Tensor], scale: float = 3.0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 + step)
    return {k: (torch.randn(p.shape, generator=g) * scale).to(p.dtype) for k, p in params.items()}


def _clone(tree: Any) -> Any:
    return optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def _leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=True)


def _kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record calls of torch's fused kernels made by gradchain (the bindings in gradchain.optim)."""
    calls: list[str] = []
    for name in ("_fused_adam_", "_fused_adamw_", "_fused_sgd_"):
        real = getattr(torch, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__", "").startswith("gradchain.optim"):
                calls.append(_name)  # not torch.optim's own calls
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return calls


# --------------------------------------------------------------------------- torch parity
def _lockstep(opt_cls: Any, rule: gc.GradientTransformation, steps: int, **kwargs: Any) -> tuple[
    dict[str, torch.nn.Parameter], list[torch.nn.Parameter], Any, torch.optim.Optimizer
]:
    """clip + ``opt_cls(fused=True)`` and ``update_and_apply_(chain(clip, rule))`` on the
    same gradients; returns (our params, torch's params, our state, torch's optimizer)."""
    params = _params()
    t_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt = opt_cls(t_params, fused=True, **kwargs)
    tx = gc.chain(gc.clip_by_norm(1.0), rule)
    live = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    state = tx.init(live)
    for step in range(steps):
        grads = _grads(step, params)
        for p, g in zip(t_params, grads.values()):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(t_params, 1.0, foreach=True)
        opt.step()
        state = gc.update_and_apply_(tx, _clone(grads), state, live)
    for (name, p), t in zip(live.items(), t_params):
        assert torch.equal(p.detach(), t.detach()), name
    return live, t_params, state, opt


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("adamw", {}),
        ("adamw", {"weight_decay": 0.3, "amsgrad": True}),
        ("adamw", {"maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
        ("adam", {}),
        ("adam", {"weight_decay": 0.1, "maximize": True, "amsgrad": True}),
    ],
)
def test_fused_step_equals_torch_fused_optimizer_bit_for_bit(
    kind: str, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _kernel_calls(monkeypatch)
    t_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    live, t_params, state, opt = _lockstep(t_cls, getattr(gc, kind)(1e-2, **kwargs), 6,
                                           lr=1e-2, **kwargs)
    adam_state = gc.tree_get(state, gc.ScaleByAdamState)
    for name, t in zip(live, t_params):
        assert torch.equal(adam_state.mu[name], opt.state[t]["exp_avg"]), name
        assert torch.equal(adam_state.nu[name], opt.state[t]["exp_avg_sq"]), name
    assert int(adam_state.count) == 6
    assert calls == [f"_fused_{kind}_"] * 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"momentum": 0.8, "dampening": 0.3, "maximize": True},
        {"weight_decay": 0.1, "maximize": True},
    ],
)
def test_fused_sgd_equals_torch_fused_sgd_bit_for_bit(
    kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _kernel_calls(monkeypatch)
    live, t_params, state, opt = _lockstep(torch.optim.SGD, gc.sgd(0.05, **kwargs), 5,
                                           lr=0.05, **kwargs)
    if kwargs.get("momentum"):
        for name, t in zip(live, t_params):
            assert torch.equal(gc.tree_get(state, gc.TraceState).trace[name],
                               opt.state[t]["momentum_buffer"]), name
    assert calls == ["_fused_sgd_"] * 5


def test_fused_step_close_to_the_unfused_path_and_same_state_layout() -> None:
    params = _params()
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(gc.linear_schedule(1e-2, 1e-3, 4)))
    pure_p, pure_s = dict(params), tx.init(params)
    live = _clone(params)
    state = tx.init(params)
    for step in range(6):
        grads = _grads(step, params)
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = gc.apply_updates(pure_p, u)
        state = gc.update_and_apply_(tx, _clone(grads), state, live)
    for k in params:
        torch.testing.assert_close(live[k], pure_p[k], rtol=1e-5, atol=1e-7)
    assert optree.tree_structure(state, none_is_leaf=True) == optree.tree_structure(
        pure_s, none_is_leaf=True
    )
    for a, b in zip(_leaves(state), _leaves(pure_s)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the schedule advanced with the adam count (a float lr would not have a count)
    assert int(state[1][-1].count) == 6


# --------------------------------------------------------------------------- gates
def _unfused_run(tx: gc.GradientTransformation, params: Any, steps: list[Any]) -> tuple[Any, Any]:
    p, s = _clone(params), tx.init(params)
    for grads in steps:
        u, s = tx.update(_clone(grads), s, p)
        p = gc.apply_updates(p, u)
    return p, s


def _fused_run(tx: gc.GradientTransformation, params: Any, steps: list[Any]) -> tuple[Any, Any]:
    p, s = _clone(params), tx.init(params)
    for grads in steps:
        s = gc.update_and_apply_(tx, _clone(grads), s, p)
    return p, s


def _assert_runs_agree(a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
    for x, y in zip(_leaves(a), _leaves(b)):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, equal_nan=True)
        else:
            assert x == y


@pytest.mark.parametrize(
    "make",
    [
        lambda: gc.chain(gc.accumulate_every(3), gc.clip_by_norm(1.0), gc.adamw(1e-2)),
        lambda: gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.adam(1e-2)),
        lambda: gc.chain(gc.loss_scale(init_scale=4.0), gc.adamw(1e-2)),
        # nested: the rule is the last member of the last member
        lambda: gc.chain(gc.clip_by_norm(1.0),
                         gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2),
                                  gc.adamw(1e-2, amsgrad=True))),
        lambda: gc.adamw(1e-2),
        lambda: gc.chain(gc.adamw(1e-2)),
    ],
    ids=["accumulate", "skip", "loss_scale", "nested", "bare", "chain-of-one"],
)
def test_gated_chains_agree_with_the_unfused_path(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _kernel_calls(monkeypatch)
    params = _params()
    steps = [_grads(i, params) for i in range(8)]
    steps[2]["w"][0, 0] = math.nan
    steps[5]["b"][1] = math.inf
    tx = make()
    fused_p, fused_s = _fused_run(tx, params, steps)
    ref = _unfused_run(tx, params, steps)
    _assert_runs_agree((fused_p, fused_s), ref)
    applied_steps = int(gc.tree_get(ref[1], gc.ScaleByAdamState).count)
    assert len(calls) == applied_steps > 0  # closed steps never reach the kernel


def test_closed_window_leaves_params_and_rule_state_untouched() -> None:
    params = _params()
    tx = gc.chain(gc.accumulate_every(2), gc.adamw(1e-2))
    live = _clone(params)
    state = tx.init(params)
    state = gc.update_and_apply_(tx, _grads(0, params), state, live)
    for k in params:
        assert torch.equal(live[k], params[k])
    assert int(state[1][0].count) == 0 and not bool(gc.applied(state))
    state = gc.update_and_apply_(tx, _grads(1, params), state, live)
    assert int(state[1][0].count) == 1 and bool(gc.applied(state))
    assert not torch.equal(live["w"], params["w"])


def test_kernel_skip_flag_path_keeps_everything() -> None:
    """On an accelerator a finiteness flag stays a tensor and reaches the kernel as
    ``found_inf``; exercise that path on CPU by handing the rule a tensor flag."""
    params = _params()
    tx = gc.adamw(gc.constant_schedule(1e-2))
    plan = fused_plan_of(tx)
    assert plan is not None
    p_leaves, spec = optree.tree_flatten(params, none_is_leaf=True)
    for flag, moves in ((torch.tensor(False), False), (torch.tensor(True), True)):
        live = [p.clone() for p in p_leaves]
        state = tx.init(params)
        g_leaves = spec.flatten_up_to(_grads(0, params))
        step = plan(state, live, g_leaves, spec)
        assert step is not None
        new = step(g_leaves, flag)
        adam = new[0]
        assert int(adam.count) == int(moves) and int(new[-1].count) == int(moves)
        assert all(torch.equal(a, b) for a, b in zip(live, p_leaves)) is not moves
        assert bool((adam.mu["w"] != 0).any()) is moves


# --------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize(
    "case", ["bfloat16-params", "mixed-dtypes", "custom-rule", "none-grad"]
)
def test_fallback_equals_donated_update_plus_apply(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _kernel_calls(monkeypatch)
    params: dict[str, Any] = _params(torch.bfloat16 if case == "bfloat16-params" else torch.float32)
    if case == "mixed-dtypes":
        params["d"] = torch.randn(4, dtype=torch.float64)
    rule = (gc.chain(gc.scale_by_adam(), gc.scale_by_learning_rate(1e-2))
            if case == "custom-rule" else gc.adamw(1e-2))
    tx = gc.chain(gc.clip_by_norm(1.0), rule)
    a_p, b_p = _clone(params), _clone(params)
    a_s, b_s = tx.init(params), tx.init(params)
    for step in range(3):
        grads = _grads(step, params)
        if case == "none-grad":
            grads["b"] = None
        a_s = gc.update_and_apply_(tx, _clone(grads), a_s, a_p)
        u, b_s = tx.update(_clone(grads), b_s, b_p, donate=True)
        gc.apply_updates_(b_p, u)
    if case in ("none-grad", "mixed-dtypes"):
        # fused: None gradients are skipped by the kernel as by the chain; leaves of
        # different dtypes go to one kernel call per (device, dtype) group
        assert len(calls) == 3 * (2 if case == "mixed-dtypes" else 1)
        _assert_runs_agree((a_p, a_s), (b_p, b_s))
        if case == "none-grad":
            assert torch.equal(a_p["b"], params["b"])
    else:  # the kernel does not fit (bfloat16 params keep float32 moments; unknown rule)
        assert calls == []
        for x, y in zip(_leaves((a_p, a_s)), _leaves((b_p, b_s))):
            assert torch.equal(x, y)


def test_under_compile_takes_the_unfused_path() -> None:
    params = _params()
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-2))

    def step(g: Any, s: Any, p: Any) -> Any:
        return gc.update_and_apply_(tx, g, s, p)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    a_p, b_p = _clone(params), _clone(params)
    a_s, b_s = tx.init(params), tx.init(params)
    for i in range(2):
        a_s = compiled(_grads(i, params), a_s, a_p)
        b_s = gc.update_and_apply_(tx, _grads(i, params), b_s, b_p)
    _assert_runs_agree((a_p, a_s), (b_p, b_s))


def test_compiled_step_writes_the_state_back_in_place() -> None:
    """Traced, the new state is written into the given-up state's tensors, so inductor
    computes it in place (no gradient-sized allocations per step)."""
    params = _params()
    tx = gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2), gc.adamw(1e-2))
    compiled = torch.compile(lambda g, s, p: gc.update_and_apply_(tx, g, s, p),
                             fullgraph=True, backend="eager")
    a_p, b_p = _clone(params), _clone(params)
    a_s, b_s = tx.init(params), tx.init(params)
    ptrs = [x.data_ptr() for x in _leaves(a_s) if isinstance(x, torch.Tensor) and x.numel() > 1]
    steps = [_grads(i, params) for i in range(4)]
    steps[1]["w"][0, 0] = math.inf
    for grads in steps:
        a_s = compiled(_clone(grads), a_s, a_p)
        b_s = gc.update_and_apply_(tx, _clone(grads), b_s, b_p)
    _assert_runs_agree((a_p, a_s), (b_p, b_s))
    assert ptrs == [x.data_ptr() for x in _leaves(a_s)
                    if isinstance(x, torch.Tensor) and x.numel() > 1]


# --------------------------------------------------------------------------- errors
def test_bad_input_raises_before_anything_changes() -> None:
    params = _params()
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-2))
    state = tx.init(params)
    before_p, before_s = _clone(params), _clone(state)
    grads = _grads(0, params)
    with pytest.raises(ValueError, match="donate is implied"):
        gc.update_and_apply_(tx, grads, state, params, donate=True)
    bad = dict(grads, b=torch.ones(4))
    with pytest.raises(ValueError, match=r"\['b'\].*shape"):
        gc.update_and_apply_(tx, bad, state, params)
    with pytest.raises(ValueError, match="grads"):
        gc.update_and_apply_(tx, {"w": grads["w"]}, state, params)
    for x, y in zip(_leaves((params, state)), _leaves((before_p, before_s))):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- cached plans
def _warm(tx: Any, params: Any, steps: int = 3) -> Any:
    state = tx.init(params)
    for i in range(steps):
        state = gc.update_and_apply_(tx, _grads(i, params), state, params)
    return state


def _outcome(fn: Any) -> Any:
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("change", [
    "param-shape", "param-dtype", "grad-dtype", "grad-noncontiguous", "grad-none",
    "grad-sparse", "moment-shape", "param-requires-grad",
])
def test_a_warm_plan_is_never_reused_for_changed_metadata(
    change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused step's fit check is memoized on the leaves' metadata; after warm steps, a
    changed leaf misses the memo and the call does what a fresh call does: the same error
    naming the same leaf, or the same (unfused) result."""
    params = {k: torch.nn.Parameter(v) for k, v in _params().items()}
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-2))
    state = _warm(tx, params)
    grads = _grads(7, params)
    if change == "param-shape":
        params["b"].data = torch.zeros(4)
    elif change == "param-dtype":
        params["b"].data = params["b"].data.double()
    elif change == "param-requires-grad":
        params["b"].requires_grad_(False)
    elif change == "grad-dtype":
        grads["b"] = grads["b"].double()
    elif change == "grad-noncontiguous":
        grads["w"] = grads["w"].t().contiguous().t()
    elif change == "grad-none":
        grads["e"] = None
    elif change == "grad-sparse":
        grads["e"] = grads["e"].to_sparse()
    elif change == "moment-shape":
        rule = list(state[1])
        k = next(i for i, x in enumerate(rule) if isinstance(x, gc.ScaleByAdamState))
        rule[k] = rule[k]._replace(mu=dict(rule[k].mu, b=torch.zeros(4)))
        state = (state[0], tuple(rule))
    calls = _kernel_calls(monkeypatch)
    # The reference: the same call on copies with a cold memo.
    ref_p = {k: torch.nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
             for k, v in params.items()}
    ref_s, ref_g = _clone(state), _clone(grads)
    with monkeypatch.context() as m:
        m.setattr(gc.optim._fused, "_FITS", MetaMemo())
        expected = _outcome(lambda: gc.update_and_apply_(tx, ref_g, ref_s, ref_p))
    cold_calls = len(calls)
    calls.clear()
    before = _clone((dict(params), state))
    got = _outcome(lambda: gc.update_and_apply_(tx, grads, state, params))
    assert got == expected
    if expected is not None:  # refused before anything changed
        for x, y in zip(_leaves((dict(params), state)), _leaves(before)):
            assert torch.equal(x, y)
        return
    assert len(calls) == cold_calls  # fused exactly where a cold call fuses
    for x, y in zip(_leaves(dict(params)), _leaves(ref_p)):
        assert torch.equal(x, y)


def test_metadata_memo_checks_every_piece_of_metadata() -> None:
    memo = MetaMemo(size=2)
    a = torch.randn(3, 4)
    memo.put("k", [a], "v")
    assert memo.get("k", [a]) == "v"
    assert memo.get("k", [torch.zeros(3, 4)]) == "v"  # metadata, not identity or values
    for other in (torch.randn(4, 3), a.double(), a.t().contiguous().t(),
                  torch.nn.Parameter(a.clone()), a.clone().requires_grad_(), a.to_sparse(),
                  a.to("meta")):
        assert memo.get("k", [other]) is MISS, other
    assert memo.get("k", [a, a]) is MISS and memo.get("k", [None]) is MISS
    assert memo.get("other", [a]) is MISS
    memo.put("k2", [a], 2)
    memo.put("k3", [a], 3)  # bounded: the oldest key goes
    assert memo.get("k", [a]) is MISS and memo.get("k3", [a]) == 3
    assert memo.put("bad", [a, None], "x") == "x" and memo.get("bad", [a, None]) is MISS


def test_gated_sgd_agrees_with_the_unfused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _kernel_calls(monkeypatch)
    params = _params()
    steps = [_grads(i, params) for i in range(8)]
    steps[3]["e"][2] = math.nan
    tx = gc.chain(gc.skip_if_nonfinite(), gc.accumulate_every(2),
                  gc.sgd(gc.constant_schedule(0.1), momentum=0.9, dampening=0.2))
    fused_run = _fused_run(tx, params, steps)
    ref = _unfused_run(tx, params, steps)
    _assert_runs_agree(fused_run, ref)
    # a window with a dropped micro-step still applies (the mean of the rest)
    assert len(calls) == int(gc.tree_get(ref[1], gc.TraceState).count) == 4


# --------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("clip", [False, True])
def test_no_decay_partition_runs_fused_kernel_per_group(
    clip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """partition({decay: adamw(wd), no_decay: adamw(0)}) through update_and_apply_ is torch's
    AdamW(fused=True) with two param groups, bit for bit, one kernel call per group."""
    calls = _kernel_calls(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    ref.load_state_dict(model.state_dict())
    # Keys in module order, so the global clip norm sums in torch's order.
    params = dict(enumerate(model.parameters()))
    ref_params = list(ref.parameters())
    labels = {k: "decay" if p.ndim == 2 else "no_decay" for k, p in params.items()}
    rule = gc.partition(
        {"decay": gc.adamw(1e-2, weight_decay=0.1), "no_decay": gc.adamw(1e-2, weight_decay=0.0)},
        labels,
    )
    tx = gc.chain(gc.clip_by_norm(1.0), rule) if clip else rule
    state = tx.init({k: p.detach() for k, p in params.items()})
    opt = torch.optim.AdamW(
        [
            {"params": [ref_params[k] for k in params if labels[k] == "decay"], "weight_decay": 0.1},
            {"params": [ref_params[k] for k in params if labels[k] == "no_decay"],
             "weight_decay": 0.0},
        ],
        lr=1e-2,
        fused=True,
    )
    for _ in range(10):
        x = torch.randn(16, 4)
        for module in (model, ref):
            module.zero_grad()
            module(x).pow(2).mean().backward()
        state = gc.update_and_apply_(tx, {k: p.grad for k, p in params.items()}, state, params)
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
        opt.step()
    assert calls == ["_fused_adamw_"] * 20
    for k, p in params.items():
        assert torch.equal(p, ref_params[k]), k
