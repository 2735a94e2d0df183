"""Helpers for the parity tests of the rules torch does not ship (lion, lamb, lars,
schedule-free, from_torch): random trees, runs of a gradchain rule, of an optax rule
(through jax, on the same numbers) and of a torch-style optimizer, and the relative error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

import gradchain as gc

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def random_tree(dtype: torch.dtype, seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


def grads_seq(dtype: torch.dtype, steps: int, seed: int = 1) -> list[dict]:
    return [random_tree(dtype, seed * 1000 + t) for t in range(steps)]


def rel_err(a: dict, b: dict) -> float:
    """max over leaves of max|a - b| / max|b| (float64)."""
    worst = 0.0
    for k in b:
        x = torch.as_tensor(np.asarray(a[k]), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(b[k]), dtype=torch.float64)
        scale = max(y.abs().max().item(), 1e-300)
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


def run_gradchain(tx: gc.GradientTransformation, params: dict, grads: list[dict]) -> dict:
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = gc.apply_updates(params, updates)
    return params


def run_optax(make: Callable[[], Any], params: dict, grads: list[dict]) -> dict:
    """Run ``make()`` (an optax transformation) on jax copies of the same numbers; float64
    under ``jax.enable_x64``."""
    import jax
    import jax.numpy as jnp
    import optax

    def to_jax(tree: dict) -> dict:
        return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}

    opt = make()
    p = to_jax(params)
    state = opt.init(p)
    @jax.jit
    def step(p: Any, state: Any, g: Any) -> Any:
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for g in grads:
        p, state = step(p, state, to_jax(g))
    return {k: torch.from_numpy(np.array(v)) for k, v in p.items()}


def run_torch(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params: dict,
              grads: list[dict], before_step: Callable[[Any], None] | None = None) -> tuple[dict, Any]:
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make(list(ps.values()))
    if before_step is not None:
        before_step(opt)
    for g in grads:
        for k, p in ps.items():
            p.grad = None if g[k] is None else g[k].clone()
        opt.step()
    return {k: p.detach() for k, p in ps.items()}, opt


@contextlib.contextmanager
def x64(on: bool) -> Iterator[None]:
    """jax in float64 (``jax_enable_x64``) inside the block, restored after."""
    import jax

    old = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", on)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def check_injected_lr(factory: Callable[..., gc.GradientTransformation], **kw: Any) -> None:
    """``inject_hyperparams(factory)`` with ``lr`` in the state (the other numbers static)
    equals ``factory`` and follows a changed ``lr``."""
    params, (g1, g2) = random_tree(torch.float64, 0), grads_seq(torch.float64, 2)
    tx = gc.inject_hyperparams(factory, static_args=tuple(k for k in kw if k != "lr"))(**kw)
    state = tx.init(params)
    ref, ref_state = factory(**kw), factory(**kw).init(params)
    for g, lr in ((g1, kw["lr"]), (g2, kw["lr"] / 2)):
        ref = factory(**{**kw, "lr": lr})
        state = gc.set_hyperparams(state, lr=lr)
        updates, state = tx.update(g, state, params)
        expected, ref_state = ref.update(g, ref_state, params)
        for k in params:
            assert torch.equal(updates[k], expected[k]), k
