"""``ChainedOptimizer`` keeps torch.optim's contract (issue 13, item 1): copies, pickling,
``torch.save``, the four state-dict hook kinds, step hooks once per ``step()``, ``.grad``
objects that survive a step, a repr naming both; ``identity()`` indistinguishable from the
bare optimizer; and the default guarantee of design.md §3 (``transactional=False``):
failures and refusals before the wrapped step change nothing but ``.grad`` values.

Every test runs the real torch machinery (hooks, pickle, torch.save, LR schedulers) with the
bare optimizer as the control.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import gradchain as gc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from speed import peak_extra_bytes  # noqa: E402  (the benchmark's "peak MB" measure)

DT = torch.float64


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=DT))
            for s in ((3, 2), (2,), (4,), (2, 2))]


def set_grads(params: list[torch.nn.Parameter], i: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(100 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=DT) * scale


def chained(params: list[torch.nn.Parameter], **kw: Any) -> gc.ChainedOptimizer:
    inner = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}],
                              lr=0.05, weight_decay=0.1)
    return gc.ChainedOptimizer(
        inner, gc.chain(gc.accumulate_every(3), gc.clip_by_norm(0.7)), **kw
    )


def assert_same(a: Any, b: Any) -> None:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def train(opt: Any, params: list[torch.nn.Parameter], steps: range) -> None:
    for i in steps:
        set_grads(params, i)
        opt.step()


def _copy_pickle(opt: gc.ChainedOptimizer) -> gc.ChainedOptimizer:
    return pickle.loads(pickle.dumps(opt))


def _copy_torch_save(opt: gc.ChainedOptimizer) -> gc.ChainedOptimizer:
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ============================================================================ copies
@pytest.mark.parametrize("how", [copy.deepcopy, _copy_pickle, _copy_torch_save],
                         ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("transactional", [False, True])
def test_a_copy_mid_window_trains_identically(how: Callable, transactional: bool) -> None:
    params = make_params()
    opt = chained(params, transactional=transactional)
    train(opt, params, range(4))  # one window applied, one micro-step into the next
    twin = how(opt)
    assert isinstance(twin, gc.ChainedOptimizer)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    # Parameters, both states and groups are copies, not shared.
    assert all(a is not b for a, b in zip(params, twin_params))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert_same(gc.to_state_dict(twin.tx_state), gc.to_state_dict(opt.tx_state))
    assert_same(twin.optimizer.state_dict(), opt.optimizer.state_dict())
    assert twin.param_groups is twin.optimizer.param_groups
    assert twin.transactional is transactional
    # the chain is still a chain (its members are known), a gate, and named alike
    assert gc.chain_members(twin.transform) is not None and gc.is_gate(twin.transform)
    assert repr(twin).splitlines()[1] == repr(opt).splitlines()[1]
    # The same public attributes as torch's test_deepcopy_copies_all_public_attrs checks.
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert {k for k in vars(twin) if not k.startswith("_")} == public
    train(opt, params, range(4, 11))
    train(twin, twin_params, range(4, 11))
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    assert_same(gc.to_state_dict(twin.tx_state), gc.to_state_dict(opt.tx_state))
    assert_same(twin.optimizer.state_dict(), opt.optimizer.state_dict())
    assert twin.last_step_applied == opt.last_step_applied


def test_a_copy_starts_without_hooks_as_torch_copies_do() -> None:
    params = make_params()
    opt = chained(params)
    bare = torch.optim.SGD(make_params(1), lr=0.1)
    for o in (opt, bare):
        o.register_step_pre_hook(lambda *a: None)
        o.register_state_dict_post_hook(lambda *a: None)
    for o in (opt, bare):
        twin = copy.deepcopy(o)
        assert not twin._optimizer_step_pre_hooks
        assert not twin._optimizer_state_dict_post_hooks
        assert o._optimizer_step_pre_hooks  # the original keeps its own


def test_a_copy_shares_should_commit_and_the_transformation() -> None:
    answers: list[bool] = []

    def should_commit() -> bool:
        answers.append(True)
        return True

    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.clip_by_norm(1.0),
                              should_commit=should_commit)
    twin = copy.deepcopy(opt)
    assert twin.should_commit is should_commit
    assert twin.transform is opt.transform
    set_grads([p for g in twin.param_groups for p in g["params"]], 0)
    twin.step()
    assert answers == [True]


def test_an_lr_scheduler_survives_a_copy_of_its_optimizer() -> None:
    params = make_params()
    opt = chained(params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    twin = copy.deepcopy(opt)  # the scheduler patched opt.step; the copy must not keep it
    assert "step" not in vars(twin)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin, step_size=1, gamma=0.5)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for o, s, ps in ((opt, sched, params), (twin, twin_sched, twin_params)):
        for i in range(3):
            set_grads(ps, i)
            o.step()
            o.step_scheduler(s)
    assert [g["lr"] for g in twin.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt.param_groups[0]["lr"] == 0.05 * 0.5


# ============================================================================ hooks
def _record_state_dict_hooks(opt: Any, log: list[str]) -> None:
    opt.register_state_dict_pre_hook(lambda o: log.append("sd-pre"))
    opt.register_state_dict_pre_hook(lambda o: log.append("sd-pre-first"), prepend=True)

    def post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        log.append("sd-post")
        return {**sd, "note": "added by a post hook"}

    opt.register_state_dict_post_hook(post)
    opt.register_state_dict_post_hook(lambda o, sd: log.append("sd-post-first"), prepend=True)

    def load_pre(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        log.append("load-pre")
        assert sd.pop("note") == "added by a post hook"
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append("load-post"))
    opt.register_load_state_dict_post_hook(lambda o: log.append("load-post-first"),
                                           prepend=True)


def test_all_four_state_dict_hook_kinds_run_in_torchs_order() -> None:
    params = make_params()
    opt = chained(params)
    bare = torch.optim.AdamW(make_params(), lr=0.05)
    logs: dict[str, list[str]] = {"ours": [], "bare": []}
    for o, name in ((opt, "ours"), (bare, "bare")):
        _record_state_dict_hooks(o, logs[name])
        train(o, params if o is opt else [p for g in bare.param_groups for p in g["params"]],
              range(3))
        sd = o.state_dict()
        assert sd["note"] == "added by a post hook"  # a post hook's result replaces the dict
        o.load_state_dict(sd)  # the pre hook removes "note" again (or the load would fail)
    assert logs["ours"] == logs["bare"] == [
        "sd-pre-first", "sd-pre", "sd-post-first", "sd-post",
        "load-pre", "load-post-first", "load-post",
    ]


def test_a_load_pre_hook_can_rewrite_the_checkpoint() -> None:
    params = make_params()
    opt = chained(params)
    train(opt, params, range(3))
    sd = opt.state_dict()

    def new_lr(o: Any, sd: dict[str, Any]) -> None:
        for g in sd["optimizer"]["param_groups"]:
            g["lr"] = 1e-4

    opt.register_load_state_dict_pre_hook(new_lr)
    opt.load_state_dict(sd)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4]


def test_global_and_local_step_hooks_fire_once_per_step_call() -> None:
    params = make_params()
    opt = chained(params)
    bare_params = make_params()
    bare = torch.optim.AdamW(bare_params, lr=0.05)
    seen: list[tuple[str, Any]] = []
    handles = [
        register_optimizer_step_pre_hook(
            lambda o, a, k: seen.append(("global-pre", o))),
        register_optimizer_step_post_hook(
            lambda o, a, k: seen.append(("global-post", o))),
    ]
    try:
        for o in (opt, bare):
            o.register_step_pre_hook(lambda o, a, k: seen.append(("local-pre", o)))
            o.register_step_post_hook(lambda o, a, k: seen.append(("local-post", o)))
        inner_seen: list[str] = []
        opt.optimizer.register_step_post_hook(lambda o, a, k: inner_seen.append("inner"))
        for i in range(6):  # windows of 3: two applied steps
            set_grads(params, i)
            set_grads(bare_params, i)
            opt.step()
            bare.step()
    finally:
        for h in handles:
            h.remove()
    ours = [name for name, o in seen if o is opt]
    theirs = [name for name, o in seen if o is bare]
    assert ours == theirs == ["global-pre", "local-pre", "local-post", "global-post"] * 6
    assert not [o for _, o in seen if o is opt.optimizer]  # globals never see the inner one
    assert inner_seen == ["inner"] * 2  # its own hooks run when it steps


def test_a_pre_hook_with_a_bad_return_value_fails_as_on_the_bare_optimizer() -> None:
    for opt in (chained(make_params()), torch.optim.AdamW(make_params(), lr=0.05)):
        opt.register_step_pre_hook(lambda o, a, k: 5)
        with pytest.raises(RuntimeError, match=r"must return None or a tuple of \(new_args, "
                                                r"new_kwargs\), but got 5"):
            opt.step()


def test_a_step_pre_hook_that_rewrites_arguments_is_honoured() -> None:
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.identity())
    calls: list[Any] = []

    def closure() -> torch.Tensor:
        calls.append("closure")
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0], closure), kwargs))
    loss = opt.step()
    assert calls == ["closure"] and loss is not None


# ============================================================================ .grad
@pytest.mark.parametrize("transactional", [False, True])
@pytest.mark.parametrize(
    "make",
    [gc.identity, lambda: gc.clip_by_norm(0.5), lambda: gc.chain(gc.accumulate_every(2),
                                                                   gc.clip_by_norm(0.5)),
     lambda: gc.chain(gc.loss_scale(init_scale=8.0), gc.clip_by_value(0.1))],
    ids=["identity", "clip", "accumulate+clip", "loss_scale+clip_by_value"],
)
def test_grad_tensor_objects_survive_an_applied_step(make: Callable, transactional: bool) -> None:
    params = make_params()
    tx = make()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), tx, transactional=transactional)
    ref_state = tx.init([[p.detach() for p in params]])
    for i in range(4):
        set_grads(params, i)
        grads = [p.grad for p in params]
        expected, ref_state = tx.update([[g.clone() for g in grads]], ref_state,
                                        [[p.detach() for p in params]])
        opt.step()
        if opt.last_step_applied:
            assert all(p.grad is g for p, g in zip(params, grads))
            # ... holding the processed gradients the wrapped step used
            for p, e in zip(params, expected[0]):
                assert torch.equal(p.grad, e)


def test_grad_is_replaced_not_overwritten_when_the_state_keeps_its_memory() -> None:
    """A transformation may keep donated memory in its state: writing into .grad would then
    corrupt the state, so the adapter assigns a new tensor there."""

    def keep_donated() -> gc.GradientTransformation:
        def init(params: Any) -> Any:
            return ([[torch.zeros_like(p) for p in g] for g in params],)

        def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
            # the new state is the donated updates themselves; the output is new memory
            return [[2 * u for u in g] for g in updates], (updates,)

        return gc.GradientTransformation(init, update)

    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), keep_donated())
    set_grads(params, 0)
    raw = [p.grad.clone() for p in params]
    opt.step()
    for p, r, kept in zip(params, raw, opt.tx_state[0][0]):
        assert torch.equal(kept, r)  # the state is intact
        assert torch.equal(p.grad, 2 * r)


# ============================================================================ repr
def test_repr_names_the_transformation_and_the_optimizer() -> None:
    opt = chained(make_params())
    text = repr(opt)
    assert text.startswith("ChainedOptimizer(")
    assert "transform=chain(accumulate_every, clip_by_norm)" in text
    assert "AdamW (" in text and "Parameter Group 1" in text and "transactional=False" in text


# ============================================================================ identity
def _loss_closure(params: list[torch.nn.Parameter], opt: Any, i: int) -> Callable[[], Any]:
    target = torch.randn(1, generator=torch.Generator().manual_seed(i), dtype=DT)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((p - target) ** 2).sum() for p in params)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
     lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
     lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True, amsgrad=True)],
    ids=["sgd-nesterov", "adamw-foreach", "adam-fused"],
)
@pytest.mark.parametrize("transactional", [False, True])
def test_an_identity_adapter_is_indistinguishable_from_the_bare_optimizer(
    make_opt: Callable, transactional: bool
) -> None:
    ours_p, bare_p = make_params(), make_params()
    ours = gc.ChainedOptimizer(make_opt(ours_p), gc.identity(), transactional=transactional)
    bare = make_opt(bare_p)
    log: dict[str, list[Any]] = {"ours": [], "bare": []}
    for o, name in ((ours, "ours"), (bare, "bare")):
        o.register_step_pre_hook(lambda o, a, k, n=name: log[n].append(("pre", len(a))))
        o.register_step_post_hook(lambda o, a, k, n=name: log[n].append(("post", len(a))))
    sched = {id(o): torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)
             for o in (ours, bare)}
    for i in range(8):
        out = {}
        for o, ps, name in ((ours, ours_p, "ours"), (bare, bare_p, "bare")):
            if i % 2:
                out[name] = o.step(_loss_closure(ps, o, i))
                grads = [p.grad for p in ps]
            else:
                set_grads(ps, i)
                grads = [p.grad for p in ps]
                out[name] = o.step()
            assert all(p.grad is g for p, g in zip(ps, grads))  # same tensor objects
            log[name].append([None if p.grad is None else p.grad.clone() for p in ps])
            sched[id(o)].step()
            if i == 5:
                o.zero_grad(set_to_none=False)
                assert all(p.grad is not None and not p.grad.any() for p in ps)
        assert (out["ours"] is None) == (out["bare"] is None)
        if out["bare"] is not None:
            assert torch.equal(out["ours"], out["bare"])
        for a, b in zip(ours_p, bare_p):
            assert torch.equal(a, b)
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in bare.param_groups]
    assert_same(log["ours"], log["bare"])  # hooks and gradients, step by step
    assert_same(ours.state_dict()["optimizer"], bare.state_dict())
    assert ours.param_groups is ours.optimizer.param_groups
    assert ours.state is ours.optimizer.state and ours.defaults is ours.optimizer.defaults
    assert isinstance(ours, torch.optim.Optimizer)
    # The torch-shaped view of the state dict is the bare one, plus the chain's entry.
    sd, bare_sd = ours.state_dict(), bare.state_dict()
    assert_same(sd["state"], bare_sd["state"])
    assert [{k: v for k, v in g.items() if k != "gradchain"} for g in sd["param_groups"]] == \
        bare_sd["param_groups"]


def test_the_profiler_sees_one_step_of_each() -> None:
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.AdamW(params, lr=0.05), gc.clip_by_norm(1.0))
    set_grads(params, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
    assert sorted(names) == ["Optimizer.step#AdamW.step", "Optimizer.step#ChainedOptimizer.step"]


# ============================================================================ the default
def _everything(opt: gc.ChainedOptimizer) -> dict[str, Any]:
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "tx": gc.to_state_dict(opt.tx_state),
        "opt": optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                               opt.optimizer.state_dict()),
        "applied": opt.last_step_applied,
    }


class _Boom(Exception):
    pass


def _raising_after(tx: gc.GradientTransformation, calls: int) -> gc.GradientTransformation:
    n = {"calls": 0}

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        n["calls"] += 1
        out = tx.update(updates, state, params, **extra)
        if n["calls"] == calls:
            raise _Boom("transformation failed after computing")
        return out

    return gc.GradientTransformation(tx.init, update)


def test_default_is_not_transactional() -> None:
    opt = gc.ChainedOptimizer(torch.optim.SGD(make_params(), lr=0.1), gc.identity())
    assert opt.transactional is False


def test_by_default_failures_and_refusals_before_the_wrapped_step_change_nothing() -> None:
    """design.md §3: params, wrapped state and chain state stay exactly as before the call
    (only .grad values may differ); a retry equals a run that never failed."""
    answers = iter([True, True, False, True, True, True, True, True])
    fail_commit = {"at": None, "n": 0}

    def should_commit() -> bool:
        fail_commit["n"] += 1
        if fail_commit["n"] == fail_commit["at"]:
            raise ConnectionError("lighthouse unreachable")
        return next(answers)

    params, ref_params = make_params(), make_params()
    tx = gc.chain(gc.accumulate_every(2), gc.clip_by_norm(0.7, error_if_nonfinite=True))
    opt = gc.ChainedOptimizer(torch.optim.AdamW(params, lr=0.05),
                              _raising_after(tx, 5), should_commit=should_commit)
    ref = gc.ChainedOptimizer(torch.optim.AdamW(ref_params, lr=0.05), tx)
    i = 0
    events = []
    while i < 10:
        set_grads(params, i)
        if i == 7 and "nonfinite" not in events:
            params[0].grad[0, 0] = float("nan")
        before = _everything(opt)
        if i == 8 and "commit-error" not in events:
            fail_commit["at"] = fail_commit["n"] + 1
        try:
            opt.step()
        except (_Boom, ConnectionError, RuntimeError) as err:
            events.append({_Boom: "transform", ConnectionError: "commit-error"}.get(
                type(err), "nonfinite"))
            assert_same(_everything(opt), before)
            continue  # retry the same micro-batch
        if i % 2 and not opt.last_step_applied:  # a closing step whose commit was refused
            events.append("refused")
            assert_same({k: v for k, v in _everything(opt).items() if k != "applied"},
                        {k: v for k, v in before.items() if k != "applied"})
            continue
        set_grads(ref_params, i)
        ref.step()
        i += 1
    assert sorted(events) == ["commit-error", "nonfinite", "refused", "transform"]
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    assert_same(gc.to_state_dict(opt.tx_state), gc.to_state_dict(ref.tx_state))
    assert_same(opt.optimizer.state_dict(), ref.optimizer.state_dict())


# ============================================================================ memory
MEM_SHAPES = ((256, 512), (512,), (128, 256), (64, 1024))  # 1 MiB of float32 gradients
SLACK = 64 * 1024


@pytest.mark.parametrize(
    "make",
    [gc.identity, lambda: gc.clip_by_norm(1.0),
     lambda: gc.chain(gc.loss_scale(init_scale=4.0), gc.clip_by_norm(1.0)),
     lambda: gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0))],
    ids=["identity", "clip", "loss_scale+clip", "skip+clip"],
)
def test_the_default_step_allocates_and_keeps_nothing_gradient_sized(make: Callable) -> None:
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in MEM_SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    adapter = gc.ChainedOptimizer(torch.optim.AdamW(ours, lr=1e-3, fused=True), make())
    torch_opt = torch.optim.AdamW(theirs, lr=1e-3, fused=True)

    def grads() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return [torch.randn(s, generator=g) * 4.0 for s in MEM_SHAPES]

    def ours_step() -> None:
        for p, g in zip(ours, grads()):
            p.grad = g
        adapter.step()

    def torch_step() -> None:
        for p, g in zip(theirs, grads()):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
        torch_opt.step()

    for _ in range(2):  # the optimizer state exists from the first step on
        ours_step()
        torch_step()
    ours_peak, torch_peak = peak_extra_bytes(ours_step), peak_extra_bytes(torch_step)
    assert ours_peak <= torch_peak + SLACK, (ours_peak, torch_peak)
    # Nothing gradient-sized is kept between steps: the chain state is scalars only.
    kept = sum(t.untyped_storage().nbytes() for t in optree.tree_leaves(adapter.tx_state)
               if isinstance(t, torch.Tensor))
    assert kept <= SLACK, kept
    assert not adapter._snapshot_buffers and not adapter._grad_buffers


# ============================================================================ misuse
def test_an_optimizer_class_instead_of_an_instance_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"optimizer is the class AdamW, not an optimizer; "
                                        r"pass an instance, e\.g\. AdamW\(model\.parameters"):
        gc.ChainedOptimizer(torch.optim.AdamW, gc.clip_by_norm(1.0))  # type: ignore[arg-type]


@pytest.mark.parametrize("call, match", [
    (lambda opt: gc.scale_loss(torch.tensor(1.0), opt),
     r"scale_loss: got the optimizer ChainedOptimizer, not a chain state; call "
     r"opt\.scale_loss\(loss\)"),
    (lambda opt: gc.applied(opt),
     r"applied: got the optimizer ChainedOptimizer, not a chain state; use "
     r"opt\.last_step_applied"),
    (lambda opt: gc.applied(opt.transform),
     r"applied: got a GradientTransformation, not its state"),
    (lambda opt: gc.scale_loss(torch.tensor(1.0), opt.transform),
     r"scale_loss: got a GradientTransformation, not its state"),
], ids=["scale_loss(adapter)", "applied(adapter)", "applied(tx)", "scale_loss(tx)"])
def test_the_adapter_or_the_transformation_where_a_state_is_expected(call: Any,
                                                                      match: str) -> None:
    opt = gc.ChainedOptimizer(torch.optim.SGD(make_params(), lr=0.1),
                              gc.chain(gc.loss_scale(init_scale=8.0), gc.clip_by_norm(1.0)))
    with pytest.raises(TypeError, match=match):
        call(opt)  # (silently 1x the loss, or a wrong flag, before)


def test_step_without_any_gradient_warns_and_does_not_advance_the_window() -> None:
    params = make_params()
    opt = chained(params)
    set_grads(params, 0)
    opt.step()  # micro-step 1 of 3; consumes the gradients
    before = _everything(opt)
    with pytest.warns(UserWarning, match="no parameter has a gradient .* the chain state did "
                                         "not advance"):
        assert opt.step() is None
    assert_same(_everything(opt), {**before, "applied": False})
    assert int(gc.tree_get(opt.tx_state, "mini_step")) == 1


def test_step_twice_without_a_backward_warns() -> None:
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.clip_by_norm(1.0))
    set_grads(params, 0)
    opt.step()
    with pytest.warns(UserWarning, match="called again with the gradients of the last applied "
                                         "step"):
        opt.step()


def test_the_adapters_warnings_point_at_the_line_that_called_step() -> None:
    """With or without step hooks and an LR scheduler's step wrapper in between."""
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.clip_by_norm(1.0))
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(); lines.append(sys._getframe().f_lineno)  # noqa: E702 (no gradient)
        opt.register_step_pre_hook(lambda o, a, k: None)
        opt.step(); lines.append(sys._getframe().f_lineno)  # noqa: E702
        torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        opt.step(); lines.append(sys._getframe().f_lineno)  # noqa: E702
    assert [(Path(w.filename).name, w.lineno) for w in caught] == \
        [(Path(__file__).name, line) for line in lines]


def test_an_ordinary_loop_raises_no_warning() -> None:
    """No false alarm: backward (fresh or accumulated into kept .grad), zero_grad either way,
    closures, held-back steps."""
    params = make_params()
    opt = chained(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(7):
            opt.zero_grad(set_to_none=bool(i % 2))
            loss = sum(((p - i) ** 2).sum() for p in params)
            loss.backward()
            opt.step()
        opt.step(_loss_closure(params, opt, 9))



def test_a_backward_that_reaches_only_some_kept_gradients_is_not_a_second_step() -> None:
    """The step-twice check looks at every gradient: a backward that accumulates into the
    kept .grad of the middle parameters only (the first and last unused) is a new step."""
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.identity())
    set_grads(params, 0)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sum((p**2).sum() for p in params[1:-1]).backward()
        opt.step()
    with pytest.warns(UserWarning, match="called again with the gradients"):
        opt.step()


def test_an_identity_adapter_hands_sparse_gradients_on_as_the_bare_optimizer_gets_them() -> None:
    """SparseAdam on an nn.Embedding(sparse=True): an identity() adapter is the bare
    optimizer; a chain that reads the gradients refuses them, naming the .grad."""
    torch.manual_seed(0)
    ours_m, bare_m = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3, sparse=True)
    bare_m.load_state_dict(ours_m.state_dict())
    ours = gc.ChainedOptimizer(torch.optim.SparseAdam(ours_m.parameters(), lr=0.1), gc.identity())
    bare = torch.optim.SparseAdam(bare_m.parameters(), lr=0.1)
    for i in range(3):
        idx = torch.tensor([i, i + 2, 7])
        for m, o in ((ours_m, ours), (bare_m, bare)):
            o.zero_grad()
            m(idx).pow(2).sum().backward()
            assert m.weight.grad.layout is torch.sparse_coo
            o.step()
        assert torch.equal(ours_m.weight, bare_m.weight)
    clipping = gc.ChainedOptimizer(torch.optim.SparseAdam(ours_m.parameters(), lr=0.1),
                                   gc.clip_by_norm(1.0))
    ours_m(torch.tensor([1])).sum().backward()
    before = ours_m.weight.detach().clone()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]\.grad is sparse"):
        clipping.step()
    assert torch.equal(ours_m.weight, before)


def test_a_gradscaler_driving_a_chain_with_its_own_loss_scale_is_refused() -> None:
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1),
                              gc.chain(gc.loss_scale(), gc.clip_by_norm(1.0)))
    scaler = torch.amp.GradScaler("cpu")
    loss = sum((p * p).sum() for p in params)
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"GradScaler.step\(\) is driving an adapter whose "
                                         r"chain has its own loss_scale\(\)"):
        scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # Without loss_scale in the chain GradScaler works as with any optimizer.
    plain = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.clip_by_norm(1.0))
    scaler = torch.amp.GradScaler("cpu")
    plain.zero_grad()
    scaler.scale(sum((p * p).sum() for p in params)).backward()
    scaler.step(plain)
    scaler.update()
    assert plain.last_step_applied


def test_a_scheduler_stepped_on_held_back_steps_warns() -> None:
    params = make_params()
    opt = chained(params)  # windows of 3
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    set_grads(params, 0)
    opt.step()  # held back
    sched.step()  # the mistake: per call, not per applied update
    set_grads(params, 1)
    with pytest.warns(UserWarning, match=r"the learning rate changed after a held-back step "
                                         r"\(param_groups lr \[0\.05, 0\.02\] -> \[0\.025, "
                                         r"0\.01\]\).*opt\.step_scheduler"):
        opt.step()
    # The right way raises nothing.
    params = make_params()
    opt = chained(params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(7):
            set_grads(params, i)
            opt.step()
            opt.step_scheduler(sched)
    assert sched.last_epoch == 2
