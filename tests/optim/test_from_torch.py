"""from_torch: any torch.optim.Optimizer as a pure transformation, bit for bit against the
optimizer object itself (torch's, lion-pytorch's, heavyball's, schedulefree's)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from _modern_refs import grads_seq, random_tree

import gradchain as gc
from gradchain.optim.from_torch import FromTorchState, from_torch
from gradchain.testing import LawViolation, check_transformation

STEPS = 30
TORCH_CASES = [
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.AdamW, dict(lr=1e-1, amsgrad=True, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=1e-1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5)),
    (torch.optim.Adagrad, dict(lr=1e-1, lr_decay=1e-3)),
    (torch.optim.Rprop, dict(lr=1e-2)),
]


def _sterbenz(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Where ``new - old`` is exact in floating point (so ``old + (new - old) == new``)."""
    return (new / 2 <= old) & (old <= 2 * new) | (new * 2 >= old) & (old >= 2 * new)


def _lockstep(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], tx: gc.GradientTransformation,
              dtype: torch.dtype, none_leaf: str | None = None,
              setup: Callable[[Any], Any] | None = None) -> tuple[int, int]:
    """Step the optimizer live and ``tx`` on the live params before each step; the state
    must match bit for bit at every step, and ``old + update`` must equal the optimizer's
    new params wherever the subtraction is exact. Returns (exact, total) element counts."""
    params = random_tree(dtype, 0)
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make(list(live.values()))
    if setup is not None:
        setup(opt)
    state = tx.init(params)
    exact = total = 0
    for t, g in enumerate(grads_seq(dtype, STEPS)):
        if none_leaf is not None and t % 3 == 1:
            g[none_leaf] = None
        old = {k: p.detach().clone() for k, p in live.items()}
        updates, state = tx.update(g, state, old)
        for k, p in live.items():
            p.grad = None if g[k] is None else g[k].clone()
        opt.step()
        for k, p in live.items():
            if g[k] is None:
                assert updates[k] is None and torch.equal(p, old[k])
                continue
            ours = old[k] + updates[k]
            same = ours == p.detach()
            assert same[_sterbenz(old[k], p.detach())].all(), k
            # elsewhere: one rounding of the sum away at most
            bound = torch.finfo(dtype).eps * torch.maximum(old[k].abs(), p.detach().abs())
            assert ((ours - p.detach()).abs() <= bound).all(), k
            exact += int(same.sum())
            total += same.numel()
        # the state, read back from the live optimizer's, bit for bit
        ours_slots = state.slots
        for i, p in enumerate(live[k] for k in sorted(live)):  # optree's leaf order
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(ours_slots[f"state/{i}/{key}"], value), key
    return exact, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,kw", TORCH_CASES, ids=[c.__name__ for c, _ in TORCH_CASES])
def test_bit_for_bit_against_torch_optim(cls: type, kw: dict, dtype: torch.dtype) -> None:
    _lockstep(lambda ps: cls(ps, **kw), from_torch(cls, **kw), dtype)


def test_every_element_exact_at_a_typical_learning_rate() -> None:
    kw = dict(lr=1e-3, weight_decay=1e-2)
    exact, total = _lockstep(lambda ps: torch.optim.AdamW(ps, **kw),
                             from_torch(torch.optim.AdamW, **kw), torch.float32)
    assert exact == total


def test_none_gradients_as_torch() -> None:
    _lockstep(lambda ps: torch.optim.Adam(ps, lr=1e-2), from_torch(torch.optim.Adam, lr=1e-2),
              torch.float32, none_leaf="w")


def test_third_party_heavyball(monkeypatch: pytest.MonkeyPatch) -> None:
    heavyball = pytest.importorskip("heavyball")
    # its torch.compile'd kernels take seconds per shape on CPU; the maths is the same
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    kw = dict(lr=1e-2, weight_decay=1e-2)
    params = random_tree(torch.float32, 0)
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = heavyball.AdamW(list(live.values()), **kw)
    tx = from_torch(heavyball.AdamW, **kw)
    state, ours = tx.init(params), params
    for g in grads_seq(torch.float32, STEPS):
        updates, state = tx.update(g, state, ours)
        ours = gc.apply_updates(ours, updates)
        for k, p in live.items():
            p.grad = g[k].clone()
        opt.step()
    for k in params:
        assert torch.equal(ours[k], live[k].detach())
    assert int(state.slots["group/step_count"]) == STEPS


def test_third_party_lion_pytorch_and_schedulefree_with_setup() -> None:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    schedulefree = pytest.importorskip("schedulefree")
    exact, total = _lockstep(lambda ps: lion_pytorch.Lion(ps, lr=1e-3, weight_decay=0.1),
                             from_torch(lion_pytorch.Lion, lr=1e-3, weight_decay=0.1),
                             torch.float32)
    assert exact == total
    train = lambda opt: opt.train()  # noqa: E731
    exact, total = _lockstep(lambda ps: schedulefree.SGDScheduleFree(ps, lr=0.1),
                             from_torch(schedulefree.SGDScheduleFree, setup=train, lr=0.1),
                             torch.float64, setup=train)
    assert exact > 0


def test_inexact_only_outside_sterbenz() -> None:
    # A big step across zero: old + (new - old) is the rounded sum, not new.
    old = {"w": torch.tensor([1e-8, 0.5], dtype=torch.float32)}
    g = {"w": torch.tensor([1.0, 1.0])}
    tx = from_torch(torch.optim.SGD, lr=0.3)
    updates, _ = tx.update(g, tx.init(old), old)
    torch_new = old["w"] - 0.3 * g["w"]
    assert (old["w"] + updates["w"])[1] == torch_new[1]
    assert abs((old["w"] + updates["w"])[0] - torch_new[0]) <= torch.finfo(torch.float32).eps


def test_state_is_plain_tensors_and_round_trips() -> None:
    params = random_tree(torch.float32, 0)
    tx = gc.chain(gc.clip_by_norm(1.0), from_torch(torch.optim.Adam, lr=1e-2, amsgrad=True))
    state = tx.init(params)
    grads = grads_seq(torch.float32, 4)
    for g in grads[:2]:
        _, state = tx.update(g, state, params)
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    back = gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))
    assert isinstance(back[1], FromTorchState)
    for a, b in zip(optree.tree_leaves(back), optree.tree_leaves(state)):
        assert torch.equal(a, b)
    u1, s1 = tx.update(grads[2], state, params)
    u2, s2 = tx.update(grads[2], back, params)
    for k in params:
        assert torch.equal(u1[k], u2[k])


def test_hyperparameters_are_state() -> None:
    params = {"w": torch.ones(2)}
    tx = from_torch(torch.optim.SGD, lr=0.1)
    state = tx.init(params)
    assert float(state.slots["group/lr"]) == 0.1
    state = state._replace(slots={**state.slots, "group/lr": torch.tensor(0.2, dtype=torch.float64)})
    updates, state = tx.update({"w": torch.ones(2)}, state, params)
    assert torch.equal(params["w"] + updates["w"], torch.full((2,), 1.0 - 0.2))
    state = state._replace(slots={**state.slots, "group/lr": torch.tensor(0.5, dtype=torch.float64)})
    updates, state = tx.update({"w": torch.ones(2)}, state, params)
    assert torch.equal(updates["w"], torch.full((2,), -0.5))


def test_betas_in_the_initial_state_are_honoured() -> None:
    params = {"w": torch.ones(2)}
    tx = from_torch(torch.optim.Adam, lr=0.1, betas=(0.9, 0.999))
    state = tx.init(params)
    state = state._replace(slots={**state.slots, "group/betas/0": torch.tensor(0.5, dtype=torch.float64)})
    _, state = tx.update({"w": torch.ones(2)}, state, params)
    assert torch.equal(state.slots["state/0/exp_avg"], torch.full((2,), 0.5))
    assert float(state.slots["group/betas/0"]) == 0.5


def test_errors() -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        from_torch(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LBFGS needs a closure.*ChainedOptimizer"):
        from_torch(torch.optim.LBFGS)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        from_torch(torch.optim.Adam, lr=-1.0)
    tx = from_torch(torch.optim.Adam)
    with pytest.raises(TypeError, match="FromTorchState"):
        tx.update({"w": torch.ones(1)}, gc.sgd().init({"w": torch.ones(1)}), {"w": torch.ones(1)})


def test_compile_and_vmap_fail_with_a_message_naming_from_torch() -> None:
    params = {"w": torch.ones(3)}
    tx = from_torch(torch.optim.Adam, lr=1e-2)
    state = tx.init(params)
    with pytest.raises(Exception, match=r"from_torch\(Adam\) cannot run under torch.compile"):
        torch.compile(tx.update, fullgraph=True, backend="eager")({"w": torch.ones(3)}, state, params)
    with pytest.raises(TypeError, match=r"from_torch\(Adam\): cannot run under torch.func"):
        torch.func.vmap(lambda g: tx.update({"w": g}, state, params)[0]["w"])(torch.ones(2, 3))
    with pytest.raises(LawViolation, match=r"law 'vmap'.*from_torch\(Adam\)"):
        check_transformation(tx, vmap=True, max_examples=2, params=params)
    with pytest.raises(LawViolation, match=r"law 'compile'.*from_torch\(Adam\)"):
        check_transformation(tx, compile=True, compile_examples=1, max_examples=2, params=params,
                             compile_backend="eager")


def test_a_chain_compiled_without_fullgraph_runs_it_eagerly() -> None:
    params = {"w": torch.ones(3)}
    tx = gc.chain(gc.clip_by_norm(1.0), from_torch(torch.optim.Adam, lr=1e-2))
    grads = {"w": torch.tensor([1.0, -2.0, 3.0])}
    compiled, _ = torch.compile(tx.update, backend="eager")(grads, tx.init(params), params)
    eager, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(compiled["w"], eager["w"])


def test_from_torch_obeys_the_eager_laws() -> None:
    check_transformation(from_torch(torch.optim.Adam, lr=1e-2, weight_decay=0.1), max_examples=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_and_apply_gives_torchs_params_bit_for_bit(dtype: torch.dtype) -> None:
    # Large steps that cross zero: the additive path is a rounding off there, the in-place
    # path copies the optimizer's new params.
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    params = random_tree(dtype, 0)
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.SGD(list(live.values()), **kw)
    tx = from_torch(torch.optim.SGD, **kw)
    ours = {k: v.clone() for k, v in params.items()}
    state = tx.init(ours)
    for t, g in enumerate(grads_seq(dtype, STEPS)):
        if t % 4 == 2:
            g["s"] = None
        state = gc.update_and_apply_(tx, {k: None if v is None else v.clone() for k, v in g.items()},
                                     state, ours)
        for k, p in live.items():
            p.grad = None if g[k] is None else g[k].clone()
        opt.step()
        for k in params:
            assert torch.equal(ours[k], live[k].detach()), (t, k)


def test_update_and_apply_behind_gates() -> None:
    params = random_tree(torch.float32, 0)
    kw = dict(lr=1e-2, amsgrad=True)
    tx = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.accumulate_every(2),
                  from_torch(torch.optim.AdamW, **kw))
    ref_tx = gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0), gc.accumulate_every(2))
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = gc.ChainedOptimizer(torch.optim.AdamW([live[k] for k in sorted(live)], **kw), ref_tx)
    ours = {k: v.clone() for k, v in params.items()}
    state = tx.init(ours)
    for t, g in enumerate(grads_seq(torch.float32, 12)):
        if t == 5:
            g["w"][0, 0] = float("nan")
        state = gc.update_and_apply_(tx, {k: v.clone() for k, v in g.items()}, state, ours)
        for k, p in live.items():
            p.grad = g[k].clone()
        opt.step()
        for k in params:
            assert torch.equal(ours[k], live[k].detach()), (t, k)
