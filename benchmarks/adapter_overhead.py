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

``--breakdown`` instead splits row 4 of ``benchmarks/speed.py`` (the small set, 28 tensors,
``AdamW(fused=True)``) into ratios measured in one run, each the median of interleaved
rounds of 20 steps, gradients alternating between two sets as in training:

* ``torch A / torch B``: two identical torch setups on separate copies (the noise floor);
* ``adapter(clip) / torch``: row 4 (``ChainedOptimizer(AdamW(fused), clip_by_norm(1.0))``
  against ``clip_grad_norm_`` + ``AdamW(fused)``);
* ``adapter(identity) / bare``: ``ChainedOptimizer(AdamW(fused), identity())`` against
  ``AdamW(fused)`` alone: what the adapter itself costs per step;
* ``row 4, steps one by one (cold)``: row 4 again, the two sides alternating step by step
  (each step starts with the other side's data in the CPU's caches, as a step right after
  a forward and backward does), ratio of median thread CPU times.

``--phases`` times the parts of the adapter's step in place (thread CPU time, medians over
2000 steps, small set and one-element leaves): torch's hook wrapper, the transformation,
the adapter's own work and the wrapped step, next to the bare step and torch's
``clip_grad_norm_``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from speed import SETS, fresh_grads, gpt2_params  # this directory (run as a script)

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


def breakdown(rounds: int, smoke: bool) -> None:
    """Row 4 of speed.py split into ratios measured in one run (see the module docstring)."""
    params = gpt2_params(**SETS["tiny" if smoke else "small"])
    pool = [[g.clone() for g in fresh_grads(params).values()] for _ in range(2)]

    def setup(kind: str):  # noqa: ANN202 (a step function)
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params.values()]
        # Each setup has its own gradient tensors (the same values): a step never finds
        # the other side's just-processed gradients in the CPU's caches.
        own = [[g.clone() for g in grads] for grads in pool]
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        chained = None
        if kind in ("clip", "identity"):
            tx = gc.clip_by_norm(MAX_NORM) if kind == "clip" else gc.identity()
            chained = gc.ChainedOptimizer(opt, tx)
        turn = [0]

        def step() -> None:
            turn[0] ^= 1
            for p, g in zip(ps, own[turn[0]]):
                p.grad = g
            if chained is not None:
                chained.step()
                return
            if kind == "torch":
                torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True)
            opt.step()

        return step

    def ratio(a, b) -> float:  # noqa: ANN001
        for _ in range(2 if smoke else 20):
            a()
            b()
        found = []
        for r in range(rounds):
            pair = []
            for fn in ((a, b) if r % 2 else (b, a)):
                t0 = time.perf_counter()
                for _ in range(1 if smoke else 20):
                    fn()
                pair.append(time.perf_counter() - t0)
            t_a, t_b = (pair[0], pair[1]) if r % 2 else (pair[1], pair[0])
            found.append(t_a / t_b)
        return statistics.median(found)

    def one_by_one(a, b) -> float:  # noqa: ANN001
        """Steps alternating one by one (each starts with the other's data in the CPU's
        caches, as a step after a forward and backward does): ratio of median step times."""
        times: tuple[list[int], list[int]] = ([], [])
        for _ in range(40 if smoke else 2000):
            for fn, out in ((a, times[0]), (b, times[1])):
                t0 = time.thread_time_ns()
                fn()
                out.append(time.thread_time_ns() - t0)
        skip = 0 if smoke else 200
        return statistics.median(times[0][skip:]) / statistics.median(times[1][skip:])

    torch_a, torch_b = setup("torch"), setup("torch")
    clip = setup("clip")
    rows = [
        ("torch A / torch B (noise floor)", ratio, torch_a, torch_b),
        ("adapter(clip) / torch (row 4)", ratio, clip, torch_a),
        ("adapter(identity) / bare AdamW", ratio, setup("identity"), setup("bare")),
        ("row 4, steps one by one (cold)", one_by_one, clip, torch_a),
    ]
    print(f"{'breakdown (small set)':34s} {'ratio':>6s}")
    for name, how, a, b in rows:
        print(f"{name:34s} {how(a, b):6.3f}")


def phases(steps: int, smoke: bool) -> None:
    """Thread CPU time of the parts of the adapter's step, in place (not each part alone in
    a loop, where its objects stay in the CPU's caches and it reads about half as much):
    the adapter's methods are wrapped with timers, so each figure includes a timer call
    (under 1 us). Small set and one-element leaves of the same tree, ``AdamW(fused)``; the
    four setups alternate step by step, so each step starts with another's data in the
    caches (as a step after a forward and backward does)."""
    from gradchain import adapter

    clock = time.thread_time_ns
    marks: dict[str, int] = {}
    originals = {
        name: getattr(adapter.ChainedOptimizer, name)
        for name in ("_step_without_grad", "_run_transform", "_wrapped_step")
    }

    def timed_method(name: str):  # noqa: ANN202 (a method)
        original = originals[name]

        def method(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            marks[name + "<"] = clock()
            out = original(self, *args, **kwargs)
            marks[name + ">"] = clock()
            return out

        return method

    for name in originals:
        setattr(adapter.ChainedOptimizer, name, timed_method(name))
    try:
        print(f"{'median us per step':44s} {'small set':>10s} {'1-element':>10s}")
        found: dict[tuple[str, str], list[float]] = {}
        for leaves in ("small", "one"):
            params = gpt2_params(**SETS["tiny" if smoke else "small"])
            if leaves == "one":
                params = {k: torch.zeros(1) for k in params}
            pool = [[g.clone() for g in fresh_grads(params).values()] for _ in range(2)]
            kinds = ("bare", "identity", "torch", "clip")
            setups = {}
            for kind in kinds:
                ps = [torch.nn.Parameter(p.detach().clone()) for p in params.values()]
                opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
                tx = gc.identity() if kind == "identity" else gc.clip_by_norm(MAX_NORM)
                chained = gc.ChainedOptimizer(opt, tx) if kind in ("identity", "clip") else None
                own = [[g.clone() for g in grads] for grads in pool]  # see breakdown()
                setups[kind] = (ps, opt, chained, own)
            rows: dict[str, list[tuple[int, ...]]] = {kind: [] for kind in kinds}
            for i in range(steps):  # the four alternate step by step (same machine noise)
                for kind, (ps, opt, chained, own) in setups.items():
                    for p, g in zip(ps, own[i % 2]):
                        p.grad = g
                    t0 = clock()
                    if chained is None:
                        if kind == "torch":
                            torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True)
                        t1 = clock()
                        opt.step()
                        rows[kind].append((clock() - t0, t1 - t0))
                        continue
                    chained.step()
                    t1 = clock()
                    m = marks
                    rows[kind].append((
                        t1 - t0,
                        m["_step_without_grad<"] - t0 + t1 - m["_step_without_grad>"],
                        m["_run_transform>"] - m["_run_transform<"],
                        m["_wrapped_step<"] - m["_step_without_grad<"]
                        - (m["_run_transform>"] - m["_run_transform<"])
                        + m["_step_without_grad>"] - m["_wrapped_step>"],
                        m["_wrapped_step>"] - m["_wrapped_step<"],
                    ))
            for kind in kinds:
                cols = [statistics.median(c) / 1e3 for c in zip(*rows[kind][steps // 10:])]
                labels = (
                    [f"{kind}: AdamW(fused).step()"] if kind == "bare" else
                    ["torch: clip_grad_norm_ + step()", "  of which clip_grad_norm_"]
                    if kind == "torch" else
                    [f"adapter({kind}).step()", "  step hooks' wrapper + step() entry",
                     "  the transformation", "  the adapter's own work",
                     "  the wrapped step (no wrapper)"]
                )
                for label, value in zip(labels, cols):
                    found.setdefault((kind, label), []).append(value)
        for (_, label), (small, one) in found.items():
            print(f"{label:44s} {small:10.1f} {one:10.1f}")
    finally:
        for name, original in originals.items():
            setattr(adapter.ChainedOptimizer, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps, untimed")
    parser.add_argument("--breakdown", action="store_true",
                        help="split speed.py's row 4 (small set) into ratios")
    parser.add_argument("--rounds", type=int, default=41, help="rounds per --breakdown ratio")
    parser.add_argument("--phases", action="store_true",
                        help="time the parts of the adapter's step in place (small set)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.phases:
        if args.smoke:
            print("smoke run: the times below are not measurements")
        phases(20 if args.smoke else 2000, args.smoke)
        return
    if args.breakdown:
        if args.smoke:
            print("smoke run: the times below are not measurements")
        breakdown(3 if args.smoke else args.rounds, args.smoke)
        return
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
