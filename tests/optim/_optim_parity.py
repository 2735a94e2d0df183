"""Shared parity harness for tests/optim: run a gradchain rule and its torch.optim twin on
the same small random tree for 100 steps and measure how far they drift apart."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import optree
import torch

import gradchain as gc

STEPS = 100
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


def make_params(dtype: torch.dtype, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None
                ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (7, 5), "b": (5,), "s": (), "c": (2, 3, 4)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def make_grads(params: dict[str, torch.Tensor], step: int, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def rel_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Max over leaves of max|ours - theirs| / max|theirs|."""
    out = 0.0
    for k, t in theirs.items():
        t = t.detach()
        d = (ours[k].detach() - t).abs().max() / t.abs().max().clamp_min(1e-30)
        out = max(out, d.item())
    return out


def round_trip(tx: gc.GradientTransformation, state: Any, params: Any) -> Any:
    """``state`` through to_state_dict -> torch.save -> torch.load(weights_only) -> back."""
    buf = io.BytesIO()
    torch.save(gc.to_state_dict(state), buf)
    buf.seek(0)
    return gc.from_state_dict(tx.init(params), torch.load(buf, weights_only=True))


def run_parity(
    torch_cls: Callable[..., torch.optim.Optimizer],
    tx: gc.GradientTransformation,
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    foreach: bool | None = False,
    steps: int = STEPS,
    shapes: dict[str, tuple[int, ...]] | None = None,
    none_leaf: bool = False,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    grad_scale: float = 1.0,
    compare_state: Callable[[torch.optim.Optimizer, dict[str, torch.Tensor], Any], float] | None = None,
    reload_at: int | None = None,
) -> float:
    """Max relative difference of the params (and of ``compare_state``'s figure) after
    ``steps`` steps. ``none_leaf`` adds a leaf that never gets a gradient; ``reload_at``
    round-trips our state through a weights_only checkpoint at that step."""
    params = make_params(dtype, shapes=shapes)
    if none_leaf:
        params["frozen"] = torch.randn(3, 2, dtype=dtype)
    tparams = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    extra = {} if foreach is None else {"foreach": foreach}
    opt = torch_cls(list(tparams.values()), **kwargs, **extra)
    sched = scheduler(opt) if scheduler is not None else None
    state = tx.init(params)
    for t in range(steps):
        grads = make_grads(params, t)
        grads = {k: v * grad_scale for k, v in grads.items()}
        if none_leaf:
            grads["frozen"] = None
        for k, p in tparams.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        if sched is not None:
            sched.step()
        if reload_at is not None and t == reload_at:
            state = round_trip(tx, state, params)
        updates, state = tx.update(grads, state, params)
        params = gc.apply_updates(params, updates)
    for k in params:
        assert params[k].dtype == dtype
    if none_leaf:
        assert torch.equal(params["frozen"], tparams["frozen"].detach())
    err = rel_diff(params, tparams)
    if compare_state is not None:
        err = max(err, compare_state(opt, tparams, state))
    return err


def check_mid_run_reload(tx_factory: Callable[[], gc.GradientTransformation], dtype: torch.dtype,
                         steps: int = 20, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """A run interrupted by a weights_only checkpoint round trip equals the uninterrupted
    run bit for bit (params and state)."""
    finals = []
    for reload in (False, True):
        tx = tx_factory()
        params = make_params(dtype, shapes=shapes)
        state = tx.init(params)
        for t in range(steps):
            if reload and t == steps // 2:
                state = round_trip(tx, state, params)
            updates, state = tx.update(make_grads(params, t), state, params)
            params = gc.apply_updates(params, updates)
        finals.append((params, state))
    (p0, s0), (p1, s1) = finals
    for a, b in zip(optree.tree_leaves((p0, s0)), optree.tree_leaves((p1, s1))):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for leaf in optree.tree_leaves(s0):
        assert isinstance(leaf, torch.Tensor)


def parity_table() -> list[tuple[str, float, float]]:
    """(torch name, max float64 error, max float32 error) over every case of every
    tests/optim/test_<name>.py grid: the figures quoted on the Optimizers docs page."""
    import importlib

    rows = []
    for name, cls_name in [
        ("adagrad", "Adagrad"), ("adadelta", "Adadelta"), ("adamax", "Adamax"),
        ("nadam", "NAdam"), ("radam", "RAdam"), ("rmsprop", "RMSprop"), ("rprop", "Rprop"),
        ("asgd", "ASGD"), ("adafactor", "Adafactor"), ("muon", "Muon"),
    ]:
        mod = importlib.import_module(f"test_{name}")
        rule = getattr(importlib.import_module(f"gradchain.optim.{name}"), name)
        cls = getattr(torch.optim, cls_name)
        shapes = getattr(mod, "SHAPES", None)
        worst = {}
        for dtype in DTYPES:
            worst[dtype] = max(
                run_parity(cls, rule(**kw), kw, dtype, None if name == "muon" else False,
                           shapes=shapes)
                for kw in mod.CASES
            )
        rows.append((cls_name, worst[torch.float64], worst[torch.float32]))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    for cls_name, f64, f32 in parity_table():
        print(f"{cls_name:10s} float64 {f64:.1e}  float32 {f32:.1e}")


def check_binding(
    torch_cls: Callable[..., torch.optim.Optimizer],
    tx: gc.GradientTransformation,
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    flags: dict[str, Any],
    steps: int = 30,
    shapes: dict[str, tuple[int, ...]] | None = None,
    none_leaf: bool = False,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> None:
    """``update_and_apply_`` runs torch's kernel: params equal ``torch_cls(**flags)``'s bit
    for bit after every step (and the binding is taken, not the generic path)."""
    from gradchain._tree import flatten
    from gradchain.update import _fused_step

    params = make_params(dtype, shapes=shapes)
    if none_leaf:
        params["frozen"] = torch.randn(3, 2, dtype=dtype)
    tparams = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ours = {k: v.clone() for k, v in params.items()}
    opt = torch_cls(list(tparams.values()), **kwargs, **flags)
    sched = scheduler(opt) if scheduler is not None else None
    state = tx.init(ours)
    for t in range(steps):
        grads = make_grads(params, t)
        if none_leaf:
            grads["frozen"] = None
        for k, p in tparams.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        if sched is not None:
            sched.step()
        p_leaves, spec = flatten(ours)
        assert _fused_step(tx, state, spec, p_leaves, spec.flatten_up_to(grads)) is not None
        state = gc.update_and_apply_(tx, grads, state, ours)
        for k in ours:
            assert torch.equal(ours[k], tparams[k].detach()), (t, k)
