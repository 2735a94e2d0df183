"""Per-step overhead of ChainedOptimizer against the same torch code without it.

Compares, on the same parameters and gradients,

* torch:   ``clip_grad_norm_(params, 1.0, foreach=True)`` then ``AdamW(foreach=True).step()``
* adapter: ``ChainedOptimizer(AdamW(foreach=True), clip_by_norm(1.0)).step()``

Both compute the same thing (checked first, on copies). Steps are timed one at a time,
alternating between the two so that machine noise hits both alike; the script prints the
median step time of each, their ratio and the absolute overhead, for a few parameter
layouts (many small tensors, where Python overhead shows, to a few large ones, where the
maths dominates). Gradients are restored before every step, outside the timed region.

Run: ``python benchmarks/adapter_overhead.py`` (``--steps``, ``--threads``);
``--smoke`` runs tiny sizes for a few steps to check that the script works (its times mean
nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradchain as gc

# name -> list of parameter shapes
LAYOUTS: dict[str, list[tuple[int, ...]]] = {
    "100 x 1k (small tensors)": [(1000,)] * 100,
    "MLP 4 x 512^2 (~1M)": [(512, 512), (512,)] * 4,
    "8 x 1M (large tensors)": [(1000, 1000)] * 8,
}
SMOKE_LAYOUTS: dict[str, list[tuple[int, ...]]] = {"smoke 6 x 16": [(4, 4), (16,)] * 3}

MAX_NORM = 1.0


def make(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    # Gradients large enough that the clip is active (norm >> 1).
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return params, grads


def set_grads(params: list, grads: list) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def torch_step(params: list, opt: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
    opt.step()


def adamw(params: list) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def check_same(shapes: list[tuple[int, ...]]) -> None:
    """Three steps of each on copies of the same parameters give the same result."""
    p1, grads = make(shapes)
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    ref = adamw(p1)
    chained = gc.ChainedOptimizer(adamw(p2), gc.clip_by_norm(MAX_NORM))
    for _ in range(3):
        set_grads(p1, grads)
        torch_step(p1, ref)
        set_grads(p2, grads)
        chained.step()
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def measure(shapes: list[tuple[int, ...]], steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per step: (torch, adapter)."""
    params, grads = make(shapes)
    ref = adamw(params)
    chained = gc.ChainedOptimizer(adamw(params), gc.clip_by_norm(MAX_NORM))
    times: dict[str, list[float]] = {"torch": [], "adapter": []}
    runs = {"torch": lambda: torch_step(params, ref), "adapter": lambda: chained.step()}
    for i in range(warmup + steps):
        order = ("torch", "adapter") if i % 2 == 0 else ("adapter", "torch")
        for name in order:
            set_grads(params, grads)
            t0 = time.perf_counter()
            runs[name]()
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(elapsed)
    return statistics.median(times["torch"]), statistics.median(times["adapter"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps, untimed")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    layouts = SMOKE_LAYOUTS if args.smoke else LAYOUTS
    steps, warmup = (3, 1) if args.smoke else (args.steps, args.warmup)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {steps} steps per variant")
    if args.smoke:
        print("smoke run: the times below are not measurements")
    print(f"{'layout':28s} {'torch ms':>9s} {'adapter ms':>11s} {'ratio':>6s} {'overhead ms':>12s}")
    for name, shapes in layouts.items():
        check_same(shapes)
        t_torch, t_adapter = measure(shapes, steps, warmup)
        print(
            f"{name:28s} {t_torch * 1e3:9.3f} {t_adapter * 1e3:11.3f} "
            f"{t_adapter / t_torch:6.2f} {(t_adapter - t_torch) * 1e3:12.3f}"
        )


if __name__ == "__main__":
    main()
