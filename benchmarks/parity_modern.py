"""The parity figures of docs/optimizers-modern.md.

For each rule torch does not ship: the largest relative error after 100 steps against its
reference over the cases of tests/optim/test_<module>.py, in float64 and float32. For
``from_torch``: how many elements ``old + update`` gives bit for bit torch's new params
(params fed back from the live optimizer at each step; the state is checked bit for bit).

Run: ``python benchmarks/parity_modern.py`` (needs the ``dev`` extra: jax, optax,
lion-pytorch, schedulefree). About a minute on one CPU core.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "optim"))

import lion_pytorch  # noqa: E402
import optax  # noqa: E402
import schedulefree  # noqa: E402
import test_from_torch as FT  # noqa: E402
import test_lamb as LB  # noqa: E402
import test_lars as LR  # noqa: E402
import test_lion as L  # noqa: E402
import test_schedule_free as SF  # noqa: E402
import torch  # noqa: E402
from _modern_refs import (  # noqa: E402
    grads_seq,
    random_tree,
    rel_err,
    run_gradchain,
    run_optax,
    run_torch,
    x64,
)

import gradchain as gc  # noqa: E402

STEPS = 100


def _inputs(dtype: torch.dtype) -> tuple[dict, list[dict]]:
    return random_tree(dtype, 0), grads_seq(dtype, STEPS)


def _vs_optax(ours: gc.GradientTransformation, ref: Callable[[], Any], dtype: torch.dtype) -> float:
    params, grads = _inputs(dtype)
    with x64(dtype == torch.float64):
        expected = run_optax(ref, params, grads)
    return rel_err(run_gradchain(ours, params, grads), expected)


def lion_vs_lion_pytorch(dtype: torch.dtype) -> Iterator[float]:
    for kw in [*L.CASES, dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True)]:
        params, grads = _inputs(dtype)
        expected, _ = run_torch(partial(lion_pytorch.Lion, **kw), params, grads)
        yield rel_err(run_gradchain(gc.lion(**kw), params, grads), expected)


def lion_vs_optax(dtype: torch.dtype) -> Iterator[float]:
    for kw in L.CASES:
        b1, b2 = kw["betas"]
        ref = partial(optax.lion, kw["lr"], b1=b1, b2=b2, weight_decay=kw["weight_decay"])
        yield _vs_optax(gc.lion(**kw), ref, dtype)


def lamb_vs_optax(dtype: torch.dtype) -> Iterator[float]:
    for kw in LB.CASES:
        b1, b2 = kw.get("betas", (0.9, 0.999))
        ref = partial(optax.lamb, kw["lr"], b1=b1, b2=b2, eps=kw.get("eps", 1e-6),
                      weight_decay=kw.get("weight_decay", 0.0), mask=kw.get("mask"))
        yield _vs_optax(gc.lamb(**kw), ref, dtype)


def lars_vs_optax(dtype: torch.dtype) -> Iterator[float]:
    for kw in LR.CASES:
        yield _vs_optax(gc.lars(**kw), partial(optax.lars, **LR._optax_kw(kw)), dtype)


def schedule_free(cls: type, make: Callable[..., gc.GradientTransformation], cases: list[dict]):
    def run(dtype: torch.dtype) -> Iterator[float]:
        for kw in cases:
            params, grads = _inputs(dtype)
            y, x = SF._run(make(**kw), params, grads)
            ref_y, ref_x = SF._reference(cls, kw, params, grads)
            yield max(rel_err(y, ref_y), rel_err(x, ref_x))

    return run


def main() -> None:
    rows = [
        ("lion vs lion_pytorch.Lion", lion_vs_lion_pytorch),
        ("lion vs optax.lion", lion_vs_optax),
        ("lamb vs optax.lamb", lamb_vs_optax),
        ("lars vs optax.lars", lars_vs_optax),
        ("schedule_free_adamw vs AdamWScheduleFree (y and x)",
         schedule_free(schedulefree.AdamWScheduleFree, gc.schedule_free_adamw, SF.ADAMW)),
        ("schedule_free_sgd vs SGDScheduleFree (y and x)",
         schedule_free(schedulefree.SGDScheduleFree, gc.schedule_free_sgd, SF.SGD)),
    ]
    for name, fn in rows:
        f64, f32 = max(fn(torch.float64)), max(fn(torch.float32))
        print(f"{name}: float64 {f64:.1e}, float32 {f32:.1e}")
    FT.STEPS = STEPS
    extra = [(torch.optim.Adam, dict(lr=1e-3)), (torch.optim.SGD, dict(lr=1e-3, momentum=0.9))]
    for cls, kw in [*FT.TORCH_CASES, *extra]:
        for dtype in (torch.float32, torch.float64):
            exact, total = FT._lockstep(partial(cls, **kw), gc.from_torch(cls, **kw), dtype)
            print(f"from_torch({cls.__name__}, {kw}) {str(dtype)[6:]}: {exact}/{total} "
                  f"elements bit-exact over {STEPS} steps with apply_updates")


if __name__ == "__main__":
    main()
