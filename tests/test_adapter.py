"""ChainedOptimizer against plain torch.optim: the torch.optim surface, gating, checkpoints,
closures, and the one host read per step.

Everything runs in float64 on tiny problems. "Bit-identical" means ``torch.equal`` on every
tensor of the parameters, the wrapped optimizer's state dict and the transformation state.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradchain as gc

DT = torch.float64


# --------------------------------------------------------------------------- helpers
def make_params(seed: int = 0, shapes: tuple[tuple[int, ...], ...] = ((3, 2), (2,))) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=DT)) for s in shapes]


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of call ``i``: the same on every run."""
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 2, generator=gen, dtype=DT)


def loss_of(params: list, i: int) -> torch.Tensor:
    x, y = batch(i)
    w, b = params
    return ((x @ w + b - y) ** 2).mean()


def set_grads(params: list, i: int, poison: float | None = None) -> None:
    """Gradients of batch ``i`` in ``.grad``; ``poison`` (nan/inf) is written into one entry."""
    for p in params:
        p.grad = None
    loss_of(params, i).backward()
    if poison is not None:
        params[0].grad[0, 0] = poison


def clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Same structure, tensors bit-identical (torch.equal, nan == nan), other leaves ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.isnan(), b.isnan()), path
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{k}]")
    else:
        assert a == b, (path, a, b)


def snapshot(opt: gc.ChainedOptimizer) -> dict[str, Any]:
    """Everything a step may change: params, the wrapped optimizer's full state dict
    (state and hyperparameters), and the transformation state."""
    return clone(
        {
            "params": [p for g in opt.param_groups for p in g["params"]],
            "optimizer": opt.optimizer.state_dict(),
            "transform": gc.to_state_dict(opt.tx_state),
        }
    )


def counting(tx: gc.GradientTransformation, calls: list) -> gc.GradientTransformation:
    """``tx`` whose ``update`` records the extra keyword arguments of each call."""

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        calls.append(dict(extra))
        return tx.update(updates, state, params, **extra)

    return gc.GradientTransformation(tx.init, update)


# --------------------------------------------------------------------------- torch.optim surface
def test_is_a_torch_optimizer_and_shares_groups_state_defaults() -> None:
    params = make_params()
    inner = torch.optim.Adam(params, lr=0.1)
    opt = gc.ChainedOptimizer(inner, gc.clip_by_norm(1.0))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.defaults is inner.defaults
    set_grads(params, 0)
    opt.step()
    assert opt.state is inner.state
    assert set(opt.state) == set(params) and "exp_avg" in opt.state[params[0]]

    # An LR scheduler built on the adapter edits the wrapped optimizer's lr.
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    set_grads(params, 1)
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.param_groups[0]["lr"] = 0.01
    assert inner.param_groups[0]["lr"] == 0.01


def test_add_param_group_fresh_state_for_new_params_existing_kept() -> None:
    a, b = make_params(0)
    (c,) = make_params(1, ((2,),))
    opt = gc.ChainedOptimizer(
        torch.optim.Adam([a, b], lr=0.1), gc.chain(gc.accumulate_every(2), gc.clip_by_norm(1.0))
    )
    for i in range(3):  # one window applied, one micro-step into the next
        set_grads([a, b], i)
        opt.step()
    before = snapshot(opt)
    opt.add_param_group({"params": [c], "lr": 0.5})

    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    assert len(opt.optimizer.param_groups[1]["params"]) == 1
    assert opt.optimizer.param_groups[1]["params"][0] is c
    acc = opt.tx_state[0]
    # Existing parameters keep their accumulator; the new one starts from zero.
    assert_same(gc.to_state_dict(acc.sums[0]), before["transform"][0]["sums"][0])
    assert torch.equal(acc.sums[1][0], torch.zeros(2, dtype=DT))
    assert int(acc.mini_step) == 1  # still mid-window
    assert_same(opt.optimizer.state_dict()["state"], before["optimizer"]["state"])

    # The next call closes the window and steps all three parameters.
    set_grads([a, b], 3)
    c.grad = torch.ones_like(c)
    c0 = c.detach().clone()
    opt.step()
    assert opt.last_step_applied
    assert not torch.equal(c.detach(), c0)
    assert "exp_avg" in opt.state[c]


def test_step_closure_runs_with_grad_enabled_and_returns_its_loss() -> None:
    params = make_params()
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.identity())
    seen: list[bool] = []

    def closure() -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_of(params, 0)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert seen == [True]
    assert isinstance(out, torch.Tensor) and out.item() == pytest.approx(loss_of(ref, 0).item())
    # Same as torch's SGD on the same closure.
    torch_opt = torch.optim.SGD(ref, lr=0.1)
    torch_opt.zero_grad()
    loss_of(ref, 0).backward()
    torch_opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r.detach())
    assert opt.step() is None  # no closure, no loss


def test_params_without_grad_are_skipped_as_torch_does() -> None:
    a, b = make_params()
    (frozen,) = make_params(7, ((4,),))
    ra, rb, rfrozen = (p.detach().clone().requires_grad_() for p in (a, b, frozen))
    opt = gc.ChainedOptimizer(torch.optim.AdamW([a, frozen, b], lr=0.1), gc.clip_by_norm(0.1))
    ref = torch.optim.AdamW([ra, rfrozen, rb], lr=0.1)
    for i in range(3):
        set_grads([a, b], i)
        opt.step()
        set_grads([ra, rb], i)
        torch.nn.utils.clip_grad_norm_([ra, rb], 0.1)
        ref.step()
    assert torch.equal(frozen.detach(), rfrozen.detach())
    assert frozen not in opt.state
    assert frozen.grad is None
    torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-12, atol=1e-14)


def test_extra_keyword_arguments_reach_the_transformation() -> None:
    params = make_params()
    calls: list[dict] = []
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=1.0), counting(gc.identity(), calls),
                              transactional=True)
    set_grads(params, 0)
    opt.step(flush=True, note="x")
    assert calls == [{"flush": True, "note": "x"}]

    # flush=True closes a partial accumulation window with the exact mean.
    params = make_params()
    p0 = [p.detach().clone() for p in params]
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=1.0), gc.accumulate_every(4))
    grads = []
    for i in range(3):
        set_grads(params, i)
        grads.append([p.grad.clone() for p in params])
        opt.step(flush=(i == 2))
        assert opt.last_step_applied == (i == 2)
    for k, p in enumerate(params):
        mean = (grads[0][k] + grads[1][k] + grads[2][k]) / 3
        torch.testing.assert_close(p.detach(), p0[k] - mean, rtol=1e-13, atol=1e-15)


def test_last_step_applied_follows_the_accumulation_window() -> None:
    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.accumulate_every(3))
    assert opt.last_step_applied is False
    seen = []
    for i in range(7):
        set_grads(params, i)
        opt.step()
        seen.append(opt.last_step_applied)
    assert seen == [False, False, True, False, False, True, False]


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.8**k),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    ],
    ids=["LambdaLR", "StepLR"],
)
def test_step_scheduler_counts_applied_steps_only(make_sched: Callable) -> None:
    """Windows of 2 micro-steps; windows holding a nan micro-step are skipped. The
    scheduler must advance once per applied window, as a torch loop that steps the
    optimizer and the scheduler only on those windows."""
    poisoned = {3, 8, 9}  # windows 1 and 4 are skipped
    n_calls = 14
    params = make_params()
    opt = gc.ChainedOptimizer(
        torch.optim.SGD(params, lr=0.1, momentum=0.9),
        gc.chain(gc.accumulate_every(2), gc.skip_if_nonfinite()),
    )
    sched = make_sched(opt)

    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref_opt = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    ref_sched = make_sched(ref_opt)

    lrs, ref_lrs, stepped = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for i in range(n_calls):
            set_grads(params, i, poison=math.nan if i in poisoned else None)
            opt.step()
            stepped.append(opt.step_scheduler(sched))
            lrs.append(opt.param_groups[0]["lr"])

            if i % 2 == 1:  # the reference: mean of the window, skipped if non-finite
                if not ({i - 1, i} & poisoned):
                    grads = []
                    for j in (i - 1, i):
                        set_grads(ref_params, j)
                        grads.append([p.grad.clone() for p in ref_params])
                    for k, p in enumerate(ref_params):
                        p.grad = (grads[0][k] + grads[1][k]) / 2
                    ref_opt.step()
                    ref_sched.step()
            ref_lrs.append(ref_opt.param_groups[0]["lr"])

    applied_windows = [w for w in range(n_calls // 2) if not ({2 * w, 2 * w + 1} & poisoned)]
    assert stepped == [i % 2 == 1 and (i // 2) in applied_windows for i in range(n_calls)]
    assert lrs == ref_lrs
    assert sched.last_epoch == len(applied_windows) == ref_sched.last_epoch
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- should_commit
def test_refused_commits_change_nothing_and_equal_never_making_the_call() -> None:
    """A scripted should_commit: it is asked only on calls that would apply, and a refused
    call leaves params, Adam's moments, the accumulator, the loss scale and its counter
    bit-identical, so the run equals one that never made the refused calls."""

    def tx() -> gc.GradientTransformation:
        return gc.chain(
            gc.loss_scale(init_scale=2.0**8, growth_interval=2),
            gc.accumulate_every(2),
            gc.clip_by_norm(0.05),
        )

    answers = iter([True, False, False, True, False, True, True, False, True])
    asked: list[int] = []
    call = {"i": -1}

    def should_commit() -> bool:
        asked.append(call["i"])
        return next(answers)

    params = make_params()
    opt = gc.ChainedOptimizer(torch.optim.Adam(params, lr=0.1), tx(), should_commit=should_commit)
    kept: list[int] = []  # data indices of the calls that were not refused
    for i in range(15):
        call["i"] = i
        before = snapshot(opt)
        for p in params:
            p.grad = None
        opt.backward(loss_of(params, i))
        opt.step()
        if asked and asked[-1] == i and not opt.last_step_applied:
            assert_same(snapshot(opt), before)  # refused: nothing moved
        else:
            kept.append(i)
    # Asked once per applying call: every call completing a window of two kept calls.
    assert len(asked) == 9 and len(set(asked)) == 9
    assert sum(1 for i in asked if i in kept) == 5

    ref_params = make_params()
    ref = gc.ChainedOptimizer(torch.optim.Adam(ref_params, lr=0.1), tx())
    for i in kept:
        for p in ref_params:
            p.grad = None
        ref.backward(loss_of(ref_params, i))
        ref.step()
    assert_same(snapshot(opt), snapshot(ref))
    assert int(gc.tree_get(opt.tx_state, "growth_tracker")) == int(
        gc.tree_get(ref.tx_state, "growth_tracker")
    )


# --------------------------------------------------------------------------- checkpoints
def _adam_accumulating(params: list) -> gc.ChainedOptimizer:
    return gc.ChainedOptimizer(
        torch.optim.Adam(params, lr=0.05),
        gc.chain(gc.accumulate_every(3), gc.clip_by_norm(0.5)),
    )


def test_state_dict_round_trip_mid_window_resumes_identically() -> None:
    params = make_params()
    opt = _adam_accumulating(params)
    for i in range(11):
        set_grads(params, i)
        opt.step()
    uninterrupted = snapshot(opt)

    params = make_params()
    opt = _adam_accumulating(params)
    for i in range(7):  # two windows applied, one micro-step into the third
        set_grads(params, i)
        opt.step()
    assert int(opt.tx_state[0].mini_step) == 1
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = _adam_accumulating(resumed)
    opt2.load_state_dict(ckpt["opt"])
    for i in range(7, 11):
        set_grads(resumed, i)
        opt2.step()
    assert_same(snapshot(opt2), uninterrupted)


def _trained(tx: gc.GradientTransformation, shapes=((3, 2), (2,)), seed: int = 0):
    params = make_params(seed, shapes)
    opt = gc.ChainedOptimizer(torch.optim.Adam(params, lr=0.05), tx)
    for i in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=DT)
        opt.step()
    return opt


@pytest.mark.parametrize(
    "source, match",
    [
        # another chain: a different member
        (lambda: _trained(gc.chain(gc.accumulate_every(3), gc.clip_by_value(0.5))), r"state\[1\]"),
        # another chain: a different window length is fine, a different order is not
        (lambda: _trained(gc.chain(gc.clip_by_norm(0.5), gc.accumulate_every(3))), r"state\[0\]"),
        # another parameter set: same group sizes, other shapes
        (lambda: _trained(gc.chain(gc.accumulate_every(3), gc.clip_by_norm(0.5)), ((2, 3), (2,))),
         r"param_groups\[0\]\['params'\]\[0\].*\(2, 3\).*\(3, 2\)"),
        # another parameter set: another number of parameters
        (lambda: _trained(gc.chain(gc.accumulate_every(3), gc.clip_by_norm(0.5)), ((3, 2),)),
         r"sizes \[1\].*\[2\]"),
    ],
    ids=["other-member", "other-order", "other-shapes", "other-count"],
)
def test_load_state_dict_mismatch_raises_and_changes_nothing(source: Callable, match: str) -> None:
    target = _trained(gc.chain(gc.accumulate_every(3), gc.clip_by_norm(0.5)), seed=1)
    target.param_groups[0]["lr"] = 0.123
    foreign = source().state_dict()
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(foreign)
    assert_same(snapshot(target), before)
    assert target.param_groups[0]["lr"] == 0.123


def test_load_state_dict_rejects_a_plain_optimizer_state_dict() -> None:
    target = _trained(gc.clip_by_norm(1.0))
    before = snapshot(target)
    with pytest.raises(ValueError, match="'optimizer'.*'transform'.*'gradchain'"):
        target.load_state_dict(target.optimizer.state_dict())
    assert_same(snapshot(target), before)


# --------------------------------------------------------------------------- errors on nan
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_clip_error_if_nonfinite_raises_and_changes_nothing(bad: float) -> None:
    params = make_params()
    opt = gc.ChainedOptimizer(
        torch.optim.Adam(params, lr=0.1),
        gc.chain(gc.clip_by_norm(1.0, error_if_nonfinite=True), gc.accumulate_every(2)),
    )
    for i in range(3):
        set_grads(params, i)
        opt.step()
    before = snapshot(opt)
    for _ in range(2):  # refused again on a second try: the first refusal left no trace
        set_grads(params, 3, poison=bad)
        with pytest.raises(RuntimeError, match="nan or inf"):
            opt.step()
        assert_same(snapshot(opt), before)
    set_grads(params, 3)  # a finite retry goes through and closes the window
    opt.step()
    assert opt.last_step_applied


# --------------------------------------------------------------------------- closures (LBFGS)
def test_lbfgs_with_clipping_converges_on_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=DT)
    a = m @ m.T + torch.eye(6, dtype=DT)
    b = torch.randn(6, generator=gen, dtype=DT) * 10
    x_star = torch.linalg.solve(a, b)
    x = torch.nn.Parameter(torch.zeros(6, dtype=DT))
    calls: list[dict] = []
    opt = gc.ChainedOptimizer(
        torch.optim.LBFGS(
            [x], max_iter=20, tolerance_grad=1e-12, tolerance_change=0,
            line_search_fn="strong_wolfe",
        ),
        counting(gc.chain(gc.clip_by_norm(10.0)), calls),
    )
    evals = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        evals.append(x.grad.norm().item())
        return loss

    for _ in range(5):
        opt.step(closure)
    assert evals[0] > 10.0  # the clip was active at the start
    assert len(calls) == len(evals)  # the transformation ran at every evaluation
    # ... on the gradients of that evaluation (the clip records the pre-clip norm)
    assert gc.tree_get(opt.tx_state, "norm").item() == pytest.approx(evals[-1], rel=1e-12)
    assert opt.last_step_applied
    torch.testing.assert_close(x.detach(), x_star, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(
    "tx", [gc.accumulate_every(2), gc.chain(gc.clip_by_norm(1.0), gc.skip_if_nonfinite())]
)
def test_lbfgs_with_a_gate_is_refused_at_construction(tx: gc.GradientTransformation) -> None:
    x = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="re-evaluates the closure.*gates"):
        gc.ChainedOptimizer(torch.optim.LBFGS([x]), tx)


def test_constructor_rejects_wrong_arguments() -> None:
    params = make_params()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gc.ChainedOptimizer(object(), gc.identity())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GradientTransformation"):
        gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), lambda g: g)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="should_commit"):
        gc.ChainedOptimizer(torch.optim.SGD(params, lr=0.1), gc.identity(), should_commit=True)


# --------------------------------------------------------------------------- host reads
class DeviceReads(TorchDispatchMode):
    """Counts copies of ``meta`` tensors to the host, and answers them.

    The meta device stands in for an accelerator: its tensors have shapes and dtypes but
    no values, so every way of reading one on the host (``.item()``, ``bool()``,
    ``.tolist()``, ``.cpu()``) shows up here as ``_local_scalar_dense``, ``_to_copy`` or
    ``copy_`` with a meta source. On a GPU each is a blocking device-to-host transfer (a
    sync). Host tensors the library keeps on the CPU on purpose (the accumulation window
    position) are read for free and are not counted. The answer is a tensor whose first
    element is ``answer`` and the rest ``False``: for the adapter's one read (the stacked
    ``[applied, clip error flags...]``) that means "apply" or "skip", with finite norms.
    """

    def __init__(self, answer: bool) -> None:
        super().__init__()
        self.answer = answer
        self.reads: list[tuple[str, tuple[int, ...]]] = []

    def _fake(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype)
        if out.numel():
            out.view(-1)[0] = self.answer
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        aten = torch.ops.aten
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is aten._local_scalar_dense.default and src is not None and src.is_meta:
            self.reads.append(("item", tuple(src.shape)))
            return self._fake(src.shape, src.dtype).item()
        if (
            func is aten._to_copy.default
            and src is not None
            and src.is_meta
            and torch.device(kwargs.get("device") or "meta").type == "cpu"
        ):
            self.reads.append(("to_cpu", tuple(src.shape)))
            return self._fake(src.shape, kwargs.get("dtype") or src.dtype)
        if func is aten.copy_.default and args[1].is_meta and not args[0].is_meta:
            self.reads.append(("copy_", tuple(args[1].shape)))
            return args[0].copy_(self._fake(args[1].shape, args[1].dtype))
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "make_tx, closes",
    [
        # device-data gates: every call must read the decision, once
        (lambda: gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0, error_if_nonfinite=True)),
         lambda i: True),
        (lambda: gc.chain(gc.loss_scale(), gc.clip_by_norm(1.0)), lambda i: True),
        # accumulation: the window is known on the host; micro-steps read nothing
        (lambda: gc.chain(gc.accumulate_every(3), gc.clip_by_norm(1.0)), lambda i: i % 3 == 2),
        (lambda: gc.chain(gc.accumulate_every(3), gc.skip_if_nonfinite(), gc.clip_by_norm(1.0)),
         lambda i: i % 3 == 2),
    ],
    ids=["skip+clip(error)", "loss_scale+clip", "accumulate+clip", "accumulate+skip+clip"],
)
def test_at_most_one_device_read_and_one_transform_call_per_step(
    make_tx: Callable, closes: Callable
) -> None:
    params = [torch.nn.Parameter(torch.empty(3, 2, device="meta")),
              torch.nn.Parameter(torch.empty(2, device="meta"))]
    calls: list[dict] = []
    commits: list[int] = []
    opt = gc.ChainedOptimizer(
        torch.optim.Adam(params, lr=0.1),
        counting(make_tx(), calls),
        should_commit=lambda: commits.append(1) is None,
    )
    for i in range(9):
        for p in params:
            p.grad = torch.empty_like(p)
        answer = i % 2 == 0  # the device says "apply" on even calls, "skip" on odd ones
        mode = DeviceReads(answer)
        with mode:
            opt.step()
        assert len(calls) == i + 1, "the transformation runs exactly once per step"
        if closes(i):
            assert len(mode.reads) == 1, mode.reads
        else:
            assert mode.reads == [], "a micro-step known on the host reads nothing"
        assert opt.last_step_applied == (closes(i) and answer)
    assert len(commits) == sum(1 for i in range(9) if closes(i) and i % 2 == 0)


# --------------------------------------------------------------------------- no_sync
class NoSyncModel(torch.nn.Module):
    """Stands in for DDP in one process: ``no_sync()`` is recorded (and changes nothing,
    as DDP with one rank)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2).double()
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.entered += 1
        yield

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _micro(model: torch.nn.Module, opt: gc.ChainedOptimizer, i: int, wrap: bool) -> None:
    x, y = batch(i)
    with opt.no_sync(model) if wrap else contextlib.nullcontext():
        opt.backward(((model(x) - y) ** 2).mean())
    opt.step()
    opt.zero_grad()


def test_no_sync_defers_sync_to_the_closing_micro_step_and_keeps_the_window() -> None:
    """no_sync is entered on micro-steps that do not close the window; on the closing one
    the window's local sums move into .grad (so DDP's one all-reduce covers the window).
    With one rank this must equal the same loop without no_sync, also when should_commit
    refuses a closing call (the window is restored, not lost with the discarded grads)."""
    answers = iter([True, False, True, True])

    def tx() -> gc.GradientTransformation:
        return gc.chain(gc.accumulate_every(3), gc.clip_by_norm(0.5))

    model = NoSyncModel()
    opt = gc.ChainedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.1), tx(), should_commit=lambda: next(answers)
    )
    kept = []
    for i in range(10):
        before = snapshot(opt)
        _micro(model, opt, i, wrap=True)
        refused = (len(kept) % 3 == 2) and not opt.last_step_applied
        if refused:
            assert_same(snapshot(opt), before)
        else:
            kept.append(i)
    assert len(kept) == 9 and model.entered == 6

    ref_model = NoSyncModel()
    ref = gc.ChainedOptimizer(torch.optim.Adam(ref_model.parameters(), lr=0.1), tx())
    for i in kept:
        _micro(ref_model, ref, i, wrap=False)
    assert_same(snapshot(opt), snapshot(ref))


def test_no_sync_needs_accumulate_every_first() -> None:
    model = NoSyncModel()
    opt = gc.ChainedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        gc.chain(gc.clip_by_norm(1.0), gc.accumulate_every(2)),
    )
    with pytest.raises(ValueError, match="accumulate_every must be the first"):
        with opt.no_sync(model):
            pass
    # Without accumulation there is nothing to defer: no_sync is a no-op.
    opt = gc.ChainedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gc.clip_by_norm(1.0))
    with opt.no_sync(model):
        pass
    assert model.entered == 0


def test_held_back_steps_consume_the_gradients_so_they_are_not_counted_twice() -> None:
    """A loop that calls zero_grad() only after applied steps equals one that calls it
    after every step: held-back steps clear .grad themselves."""
    torch.manual_seed(0)
    data = [torch.randn(4, 3, dtype=torch.float64) for _ in range(8)]

    def run(zero_every_step: bool) -> torch.Tensor:
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1).double()
        opt = gc.ChainedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), gc.accumulate_every(4)
        )
        for x in data:
            model(x).pow(2).mean().backward()
            opt.step()
            if not opt.last_step_applied:
                assert all(p.grad is None for p in model.parameters())
            if zero_every_step or opt.last_step_applied:
                opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(True), run(False))
