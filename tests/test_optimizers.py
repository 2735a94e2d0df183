"""Tests for gradchain.optimizers: torch.optim parity, None gradients, tracing, gradients
through ``update``, state as data and argument validation."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch

import gradchain as gc
from gradchain.optim._fused import fused_plan_of

STEPS = 100
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# --------------------------------------------------------------------------- helpers
def make_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=g, dtype=dtype),
        "b": torch.randn(5, generator=g, dtype=dtype),
        "s": torch.randn((), generator=g, dtype=dtype),
        "c": torch.randn(2, 3, 4, generator=g, dtype=dtype),
    }


def make_grads(params: dict[str, torch.Tensor], step: int, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def rel_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Max over leaves of max|ours - theirs| / max|theirs| (relative to the leaf's scale,
    so elements that cross zero do not blow the measure up)."""
    out = 0.0
    for k, t in theirs.items():
        t = t.detach()
        out = max(out, ((ours[k] - t).abs().max() / t.abs().max().clamp_min(1e-30)).item())
    return out


def run_parity(
    torch_cls: type[torch.optim.Optimizer],
    tx: gc.GradientTransformation,
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    foreach: bool | None,
    steps: int = STEPS,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    drop: Callable[[int], set[str]] | None = None,
) -> float:
    params = make_params(dtype)
    tparams = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch_cls(list(tparams.values()), foreach=foreach, **kwargs)
    sched = scheduler(opt) if scheduler is not None else None
    state = tx.init(params)
    for t in range(steps):
        grads = make_grads(params, t)
        if drop is not None:
            for k in drop(t):
                grads[k] = None
        for k, p in tparams.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        if sched is not None:
            sched.step()
        updates, state = tx.update(grads, state, params)
        params = gc.apply_updates(params, updates)
    for k in params:
        assert params[k].dtype == dtype
    return rel_diff(params, tparams)


SGD_CASES = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, weight_decay=0.1),
    dict(lr=0.05, maximize=True),
    dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.1, maximize=True),
    dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.05, maximize=True),
]
ADAM_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, maximize=True),
    dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True),
]
ADAMW_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-3, weight_decay=0.1),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, maximize=True),
    dict(lr=3e-2, weight_decay=0.3, amsgrad=True, maximize=True),
]
DTYPES = [torch.float32, torch.float64]
FOREACH = [False, None]


@pytest.mark.parametrize("foreach", FOREACH, ids=["single", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_matches_torch(kwargs: dict[str, Any], dtype: torch.dtype, foreach: bool | None):
    err = run_parity(torch.optim.SGD, gc.sgd(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


@pytest.mark.parametrize("foreach", FOREACH, ids=["single", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=str)
def test_adam_matches_torch(kwargs: dict[str, Any], dtype: torch.dtype, foreach: bool | None):
    err = run_parity(torch.optim.Adam, gc.adam(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


@pytest.mark.parametrize("foreach", FOREACH, ids=["single", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kwargs", ADAMW_CASES, ids=str)
def test_adamw_matches_torch(kwargs: dict[str, Any], dtype: torch.dtype, foreach: bool | None):
    err = run_parity(torch.optim.AdamW, gc.adamw(**kwargs), kwargs, dtype, foreach)
    assert err <= RTOL[dtype]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_defaults_match_torch(name: str):
    """Default arguments (including lr=1e-3 and AdamW's weight_decay=1e-2) match."""
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    tx = getattr(gc, name)()
    err = run_parity(torch_cls[name], tx, {}, torch.float64, False, steps=20)
    assert err <= 1e-12


def test_multi_tensor_torch_also_matches():
    """torch's foreach=True implementation (the default on accelerators) agrees too."""
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.1)
    assert run_parity(torch.optim.AdamW, gc.adamw(**kw), kw, torch.float32, True) <= 1e-5
    kw2 = dict(lr=0.05, momentum=0.9, nesterov=True)
    assert run_parity(torch.optim.SGD, gc.sgd(**kw2), kw2, torch.float32, True) <= 1e-5


def test_tensor_lr_matches_float_lr():
    kw = dict(betas=(0.9, 0.99), amsgrad=True)
    a = run_parity(torch.optim.Adam, gc.adam(lr=torch.tensor(1e-2), **kw), dict(lr=1e-2, **kw),
                   torch.float32, False, steps=30)  # fmt: skip
    assert a <= 1e-5
    # A 1-element (not 0-dim) tensor behaves the same and keeps leaf shapes.
    tx = gc.sgd(lr=torch.tensor([0.5]))
    params = {"s": torch.tensor(1.0)}
    updates, _ = tx.update({"s": torch.tensor(2.0)}, tx.init(params), params)
    assert updates["s"].shape == () and updates["s"].item() == -1.0


def test_float64_tensor_lr_keeps_float32_dtype():
    tx = gc.adam(lr=torch.tensor(1e-2, dtype=torch.float64))
    params = {"s": torch.tensor(1.0), "w": torch.ones(3)}
    updates, state = tx.update(
        {"s": torch.tensor(2.0), "w": torch.ones(3)}, tx.init(params), params
    )
    assert updates["s"].dtype == torch.float32 and updates["w"].dtype == torch.float32


# --------------------------------------------------------------------------- schedules as lr
SCHEDULES = {
    "cosine": lambda: gc.cosine_decay_schedule(0.05, decay_steps=60, alpha=0.1),
    "warmup_cosine": lambda: gc.warmup_cosine_decay_schedule(0.0, 0.05, 10, 80, end_value=1e-3),
    "step": lambda: gc.step_decay(0.05, step_size=7, gamma=0.5),
    "exp": lambda: gc.exponential_decay(0.05, 1, 0.97),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize(
    "name,torch_cls,kwargs",
    [
        ("sgd", torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
        ("adam", torch.optim.Adam, dict(amsgrad=True)),
        ("adamw", torch.optim.AdamW, dict(weight_decay=0.5)),
    ],
)
def test_schedule_lr_matches_lambda_lr(sched_name, name, torch_cls, kwargs):
    """A schedule as lr is torch's LambdaLR on the same lambda: the first applied update
    sees count 0 (LambdaLR's epoch 0)."""
    sched = SCHEDULES[sched_name]()
    base = 0.05

    def lr_lambda(epoch: int) -> float:
        return sched(epoch) / base

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    tx = getattr(gc, name)(lr=sched, **kwargs)
    err = run_parity(
        torch_cls, tx, dict(lr=base, **kwargs), torch.float32, False, scheduler=scheduler
    )
    assert err <= 1e-5


def test_schedule_count_in_state():
    tx = gc.sgd(lr=gc.linear_schedule(1.0, 0.0, 10))
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    assert gc.tree_get(state, "count").dtype == torch.int64
    for _ in range(3):
        _, state = tx.update({"w": torch.ones(2)}, state, params)
    assert int(gc.tree_get(state, "count")) == 3


def test_closed_gate_steps_do_not_count():
    """Behind a gate, closed steps advance neither the schedule nor the moments."""
    tx = gc.chain(gc.skip_if_nonfinite(), gc.adam(lr=gc.linear_schedule(1.0, 0.0, 10)))
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"w": torch.ones(2)}, state, params)
    before = gc.to_state_dict(state[1])
    updates, state = tx.update({"w": torch.tensor([1.0, math.nan])}, state, params)
    assert torch.equal(updates["w"], torch.zeros(2))
    after = gc.to_state_dict(state[1])
    assert optree.tree_all(optree.tree_map(lambda a, b: torch.equal(a, b), before, after))
    assert int(gc.tree_get(state, gc.ScaleByScheduleState).count) == 1
    assert int(gc.tree_get(state, gc.ScaleByAdamState).count) == 1


# --------------------------------------------------------------------------- None gradients
@pytest.mark.parametrize(
    "tx",
    [
        gc.sgd(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1, maximize=True),
        gc.sgd(lr=0.1, momentum=0.9, nesterov=True),
        gc.adam(lr=0.1, amsgrad=True, weight_decay=0.1),
        gc.adamw(lr=gc.cosine_decay_schedule(0.1, 10), amsgrad=True),
    ],
    ids=["sgd", "sgd_nesterov", "adam", "adamw_sched"],
)
def test_none_gradient_passes_through_and_keeps_state(tx):
    params = make_params(torch.float32)
    state = tx.init(params)
    for t in range(3):
        _, state = tx.update(make_grads(params, t), state, params)
    grads = make_grads(params, 3)
    grads["b"] = None
    updates, new_state = tx.update(grads, state, params)
    assert updates["b"] is None
    for k in ("w", "s", "c"):
        assert updates[k].shape == params[k].shape

    def per_param(st):
        # The entries of the state trees that belong to parameter "b".
        out = []
        for node in optree.tree_leaves(st, is_leaf=lambda x: isinstance(x, dict)):
            if isinstance(node, dict) and "b" in node:
                out.append(node["b"])
        return out

    old_b, new_b = per_param(state), per_param(new_state)
    assert old_b, "the transformation should have per-parameter state"
    for o, n in zip(old_b, new_b):
        assert torch.equal(o, n)
    # ... while the other parameters' state moved on.
    assert any(not torch.equal(o["w"], n["w"]) for o, n in _dict_pairs(state, new_state))


def _dict_pairs(a, b):
    la = optree.tree_leaves(a, is_leaf=lambda x: isinstance(x, dict) and "w" in x)
    lb = optree.tree_leaves(b, is_leaf=lambda x: isinstance(x, dict) and "w" in x)
    return [(x, y) for x, y in zip(la, lb) if isinstance(x, dict)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_sgd_momentum_with_intermittent_none_matches_torch(dtype):
    """torch skips parameters without a gradient; so does gradchain (buffer unchanged)."""
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)

    def drop(t: int) -> set[str]:
        return {"b"} if t % 3 == 1 else ({"s"} if t % 5 == 2 else set())

    err = run_parity(torch.optim.SGD, gc.sgd(**kw), kw, dtype, False, drop=drop)
    assert err <= RTOL[dtype]


def test_all_none_gradients():
    tx = gc.adam(lr=0.1)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    updates, new_state = tx.update({"w": None}, state, params)
    assert updates == {"w": None}
    assert torch.equal(new_state[0].mu["w"], state[0].mu["w"])


# --------------------------------------------------------------------------- building blocks
def test_trace_first_step_is_undamped_copy():
    tx = gc.trace(0.9, dampening=0.5)
    params = {"w": torch.zeros(3)}
    state = tx.init(params)
    g1, g2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])
    u1, state = tx.update({"w": g1}, state, params)
    assert torch.equal(u1["w"], g1) and torch.equal(state.trace["w"], g1)
    u2, state = tx.update({"w": g2}, state, params)
    torch.testing.assert_close(u2["w"], 0.9 * g1 + 0.5 * g2)
    assert int(state.count) == 2


def test_scale_by_adam_first_step_and_state():
    tx = gc.scale_by_adam(b1=0.5, b2=0.75, eps=0.0)
    g = torch.tensor([2.0, -3.0], dtype=torch.float64)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    updates, state = tx.update({"w": g}, tx.init(params))
    torch.testing.assert_close(updates["w"], torch.sign(g))
    torch.testing.assert_close(state.mu["w"], 0.5 * g)
    torch.testing.assert_close(state.nu["w"], 0.25 * g * g)
    assert state.nu_max == () and state.count.dtype == torch.int64


def test_add_decayed_weights_requires_params():
    tx = gc.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": torch.ones(1)}, tx.init(None))
    with pytest.raises(ValueError, match="params"):
        gc.sgd(weight_decay=0.1).update({"w": torch.ones(1)}, gc.sgd(weight_decay=0.1).init({}))


def test_scale_by_learning_rate_flip_sign_and_float():
    tx = gc.scale_by_learning_rate(0.5, flip_sign=False)
    assert tx.init({"w": torch.zeros(1)}) == gc.EmptyState()
    assert tx.update({"w": torch.ones(1)}, gc.EmptyState())[0]["w"].item() == 0.5
    tx = gc.scale_by_learning_rate(lambda count: 0.25)  # a user schedule returning a float
    state = tx.init({"w": torch.zeros(1)})
    assert isinstance(state, gc.ScaleByScheduleState)
    assert tx.update({"w": torch.ones(1)}, state)[0]["w"].item() == -0.25


def test_low_precision_moments_are_float32():
    params = {"w": torch.ones(4, dtype=torch.bfloat16), "h": torch.ones(2, dtype=torch.float16)}
    for tx in (gc.adam(lr=0.1, amsgrad=True), gc.sgd(lr=0.1, momentum=0.9)):
        state = tx.init(params)
        grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        for k in params:
            assert updates[k].dtype == params[k].dtype
        for leaf in optree.tree_leaves(state):
            if leaf.dim() > 0:
                assert leaf.dtype == torch.float32


def test_mixed_dtype_tree():
    """Leaves of several dtypes in one tree: each matches a single-dtype run."""
    p32, p64 = make_params(torch.float32), make_params(torch.float64)
    mixed = {"a": p32["w"], "b": p64["w"], "c": p32["s"], "d": p64["s"]}
    tx = gc.adam(lr=1e-2, amsgrad=True)
    sm, s32, s64 = tx.init(mixed), tx.init(p32), tx.init(p64)
    for t in range(5):
        g32, g64 = make_grads(p32, t), make_grads(p64, t)
        gm = {"a": g32["w"], "b": g64["w"], "c": g32["s"], "d": g64["s"]}
        um, sm = tx.update(gm, sm, mixed)
        u32, s32 = tx.update(g32, s32, p32)
        u64, s64 = tx.update(g64, s64, p64)
        assert torch.equal(um["a"], u32["w"]) and torch.equal(um["c"], u32["s"])
        assert torch.equal(um["b"], u64["w"]) and torch.equal(um["d"], u64["s"])
        assert um["c"].dtype == torch.float32 and um["d"].dtype == torch.float64


def test_update_is_pure():
    tx = gc.adamw(lr=0.1, amsgrad=True)
    params = make_params(torch.float32)
    state = tx.init(params)
    _, state = tx.update(make_grads(params, 0), state, params)
    grads = make_grads(params, 1)
    snapshot = optree.tree_map(torch.clone, (grads, state, params))
    tx.update(grads, state, params)
    same = optree.tree_map(torch.equal, snapshot, (grads, state, params))
    assert optree.tree_all(same)


# --------------------------------------------------------------------------- state as data
@pytest.mark.parametrize(
    "tx",
    [
        gc.sgd(lr=gc.step_decay(0.1, 2), momentum=0.9),
        gc.adam(lr=0.1),
        gc.adam(lr=0.1, amsgrad=True),
        gc.adamw(lr=gc.cosine_decay_schedule(0.1, 5), amsgrad=True, maximize=True),
    ],
    ids=["sgd", "adam", "adam_amsgrad", "adamw"],
)
def test_state_round_trips(tx):
    params = make_params(torch.float32)
    state = tx.init(params)
    for t in range(2):
        _, state = tx.update(make_grads(params, t), state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    loaded = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    assert optree.tree_structure(loaded) == optree.tree_structure(state)
    assert optree.tree_all(optree.tree_map(torch.equal, loaded, state))
    g = make_grads(params, 5)
    a, _ = tx.update(g, state, params)
    b, _ = tx.update(g, loaded, params)
    assert optree.tree_all(optree.tree_map(torch.equal, a, b))


def test_amsgrad_state_does_not_load_into_plain_adam():
    params = {"w": torch.zeros(2)}
    sd = gc.to_state_dict(gc.adam(amsgrad=True).init(params))
    with pytest.raises(ValueError, match="nu_max"):
        gc.from_state_dict(gc.adam().init(params), sd)


# --------------------------------------------------------------------------- tracing
def _tiny() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(3, 2), "s": torch.randn(())}


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: gc.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda: gc.adam(lr=0.1, amsgrad=True),
        lambda: gc.adamw(lr=gc.warmup_cosine_decay_schedule(0.0, 0.1, 1, 5), maximize=True),
    ],
    ids=["sgd_nesterov", "adam_amsgrad", "adamw_schedule"],
)
def test_update_compiles_fullgraph(make_tx):
    torch._dynamo.reset()
    tx = make_tx()
    params = _tiny()
    state = tx.init(params)
    cparams, cstate = params, state
    compiled = torch.compile(tx.update, fullgraph=True)
    for _ in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        u, state = tx.update(grads, state, params)
        cu, cstate = compiled(grads, cstate, cparams)
        params, cparams = gc.apply_updates(params, u), gc.apply_updates(cparams, cu)
    for k in params:
        torch.testing.assert_close(cparams[k], params[k], rtol=1e-6, atol=1e-6)
    assert optree.tree_all(
        optree.tree_map(
            lambda a, b: bool(torch.allclose(a, b, rtol=1e-6, atol=1e-7)), cstate, state
        )
    )


def _stack(trees: list[Any]) -> Any:
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: gc.sgd(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1),
        lambda: gc.sgd(lr=0.1, momentum=0.9, nesterov=True),
        lambda: gc.adam(lr=0.1, amsgrad=True, weight_decay=0.1),
        lambda: gc.adamw(lr=gc.warmup_cosine_decay_schedule(0.0, 0.1, 2, 6)),
    ],
    ids=["sgd_dampening", "sgd_nesterov", "adam_amsgrad", "adamw_schedule"],
)
def test_update_vmaps_over_a_batch_of_states(make_tx):
    tx = make_tx()
    torch.manual_seed(0)
    members = [_tiny() for _ in range(4)]
    members = [{k: v + i for k, v in m.items()} for i, m in enumerate(members)]
    states = [tx.init(p) for p in members]
    batched_params, batched_state = _stack(members), _stack(states)
    vupdate = torch.func.vmap(tx.update)
    for _ in range(3):
        grads = [{k: torch.randn_like(v) for k, v in p.items()} for p in members]
        bu, batched_state = vupdate(_stack(grads), batched_state, batched_params)
        batched_params = gc.apply_updates(batched_params, bu)
        for i in range(4):
            u, states[i] = tx.update(grads[i], states[i], members[i])
            members[i] = gc.apply_updates(members[i], u)
    for i in range(4):
        for k in members[i]:
            torch.testing.assert_close(batched_params[k][i], members[i][k], rtol=1e-6, atol=1e-7)
    counts = [x for x in optree.tree_leaves(batched_state) if x.dtype == torch.int64]
    assert counts and all(torch.equal(c, torch.full((4,), 3)) for c in counts)


# --------------------------------------------------------------------------- gradients through update
def _unrolled_loss(
    make_tx: Callable[[Any], gc.GradientTransformation], lr: torch.Tensor
) -> torch.Tensor:
    """Loss after 4 steps on a quadratic whose gradients depend on the params."""
    g = torch.Generator().manual_seed(3)
    target = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "s": torch.randn((), generator=g, dtype=torch.float64)}  # fmt: skip
    params = {k: torch.zeros_like(v) for k, v in target.items()}
    tx = make_tx(lr)
    state = tx.init(params)
    for _ in range(4):
        grads = {k: 2 * (params[k] - target[k]) * (1 + params[k] ** 2) for k in params}
        updates, state = tx.update(grads, state, params)
        params = gc.apply_updates(params, updates)
    return sum(((params[k] - target[k]) ** 2).sum() for k in params)  # type: ignore[return-value]


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda lr: gc.sgd(lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda lr: gc.adam(lr=lr, amsgrad=True),
        lambda lr: gc.adamw(lr=lr, weight_decay=0.5),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_gradient_flows_to_tensor_lr(make_tx):
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_unrolled_loss(make_tx, lr), lr)
    assert grad.item() != 0.0
    h = 1e-6
    with torch.no_grad():
        up = _unrolled_loss(make_tx, torch.tensor(0.05 + h, dtype=torch.float64))
        down = _unrolled_loss(make_tx, torch.tensor(0.05 - h, dtype=torch.float64))
    fd = (up - down) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-8)


def test_gradient_flows_to_input_gradients():
    tx = gc.adam(lr=0.1)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    g = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    state = tx.init(params)
    _, state = tx.update({"w": torch.ones(3, dtype=torch.float64)}, state, params)
    updates, _ = tx.update({"w": g}, state, params)
    (dg,) = torch.autograd.grad(updates["w"].sum(), g)
    assert torch.all(dg != 0)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "factory,kwargs,match",
    [
        (gc.sgd, dict(lr=-0.1), "lr"),
        (gc.sgd, dict(lr=float("nan")), "lr"),
        (gc.sgd, dict(momentum=-0.1), "momentum"),
        (gc.sgd, dict(weight_decay=-1e-4), "weight_decay"),
        (gc.sgd, dict(nesterov=True), "nesterov"),
        (gc.sgd, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
        (gc.sgd, dict(lr=torch.tensor([0.1, 0.2])), "lr"),
        (gc.sgd, dict(lr=torch.tensor(-0.1)), "lr"),
        (gc.adam, dict(lr=-1e-3), "lr"),
        (gc.adam, dict(eps=-1e-8), "eps"),
        (gc.adam, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (gc.adam, dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
        (gc.adam, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (gc.adam, dict(betas=(0.9,)), "betas"),
        (gc.adam, dict(weight_decay=-0.1), "weight_decay"),
        (gc.adamw, dict(lr=-1e-3), "lr"),
        (gc.adamw, dict(eps=-1.0), "eps"),
        (gc.adamw, dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (gc.adamw, dict(weight_decay=-0.01), "weight_decay"),
        (gc.scale_by_adam, dict(b1=1.0), "b1"),
        (gc.scale_by_adam, dict(b2=-0.5), "b2"),
        (gc.scale_by_adam, dict(eps=-1.0), "eps"),
        (gc.trace, dict(momentum=-0.5), "momentum"),
        (gc.trace, dict(momentum=0.0, nesterov=True), "nesterov"),
    ],
)
def test_invalid_arguments_raise_value_error(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_torch_rejects_the_same_arguments():
    """Every argument combination we reject, torch.optim rejects too (and vice versa here)."""
    p = [torch.zeros(1, requires_grad=True)]
    for cls, kw in [
        (torch.optim.SGD, dict(lr=-0.1)),
        (torch.optim.SGD, dict(nesterov=True)),
        (torch.optim.Adam, dict(betas=(1.0, 0.999))),
        (torch.optim.AdamW, dict(eps=-1.0)),
    ]:
        with pytest.raises(ValueError):
            cls(p, **kw)
    # Boundary values both accept.
    torch.optim.Adam(p, lr=0.0, betas=(0.0, 0.0), eps=0.0)
    gc.adam(lr=0.0, betas=(0.0, 0.0), eps=0.0)
    torch.optim.SGD(p, lr=0.0, momentum=0.0, weight_decay=0.0)
    gc.sgd(lr=0.0, momentum=0.0, weight_decay=0.0)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="lr"):
        gc.sgd(lr="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step_size"):
        gc.scale(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="weight_decay"):
        gc.add_decayed_weights("x")  # type: ignore[arg-type]


def test_extra_keywords_are_ignored():
    tx = gc.adam(lr=0.1)
    params = {"w": torch.zeros(2)}
    a, _ = tx.update({"w": torch.ones(2)}, tx.init(params), params, flush=True, foo=1)
    b, _ = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    assert torch.equal(a["w"], b["w"])


# --------------------------------------------------------------------------- adamw(mask=...)
def _decay_mask(params):
    return {k: p.ndim > 1 for k, p in params.items()}


def test_adamw_mask_fused_equals_torch_adamw_with_a_no_decay_group():
    """adamw(mask=...) in update_and_apply_ runs torch's fused kernel on both subsets and
    equals AdamW(fused=True) with two param groups (weight_decay 0 for the second), bit for
    bit; the unfused path agrees to rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    params = dict(model.named_parameters())
    ref = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    pure = {k: p.detach().clone() for k, p in params.items()}
    mask = _decay_mask(params)
    torch_opt = torch.optim.AdamW(
        [{"params": [ref[k] for k in ref if mask[k]]},
         {"params": [ref[k] for k in ref if not mask[k]], "weight_decay": 0.0}],
        lr=1e-2, weight_decay=0.1, fused=True,
    )
    tx = gc.adamw(1e-2, weight_decay=0.1, mask=_decay_mask)
    state, pure_state = tx.init(params), tx.init(pure)
    p_leaves, spec = optree.tree_flatten(params, none_is_leaf=True)
    plan = fused_plan_of(tx)(state, p_leaves, [torch.zeros_like(p) for p in p_leaves], spec)
    assert plan is not None  # the fused kernel serves both subsets
    for _ in range(5):
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        state = gc.update_and_apply_(tx, {k: g.clone() for k, g in grads.items()}, state, params)
        u, pure_state = tx.update(grads, pure_state, pure)
        pure = gc.apply_updates(pure, u)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_opt.step()
    for k in params:
        assert torch.equal(params[k].detach(), ref[k].detach()), k
        torch.testing.assert_close(pure[k], ref[k].detach(), rtol=1e-5, atol=1e-7)
    assert int(gc.tree_get(state, gc.ScaleByAdamState).count) == 5


def test_adamw_mask_against_optax_float64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
              "b": torch.randn(2, generator=gen, dtype=torch.float64)}
    mask = {"w": True, "b": False}
    tx = gc.adamw(1e-2, weight_decay=0.3, mask=mask)
    ref = optax.adamw(1e-2, weight_decay=0.3, mask=mask, eps=1e-8)
    jp = {k: jax.numpy.asarray(v.numpy()) for k, v in params.items()}
    state, ref_state = tx.init(params), ref.init(jp)
    for _ in range(10):
        g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        u, state = tx.update(g, state, params)
        ru, ref_state = ref.update({k: jax.numpy.asarray(v.numpy()) for k, v in g.items()},
                                   ref_state, jp)
        params = gc.apply_updates(params, u)
        jp = optax.apply_updates(jp, ru)
        for k in params:
            np.testing.assert_allclose(params[k].numpy(), np.asarray(jp[k]), rtol=1e-12, atol=0)


def test_adamw_mask_validates():
    params = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(TypeError, match="mask"):
        gc.adamw(mask={"w": 1, "b": 0}).init(params)
    with pytest.raises(ValueError, match="mask"):
        gc.adamw(mask={"w": True}).init(params)
