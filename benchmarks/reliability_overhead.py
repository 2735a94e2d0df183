"""What reliability costs: input validation per update, and the transactional adapter step.

1. Validation. Every ``update`` checks its gradients (dense floating tensors) in
   ``tree.Leaves`` and the state leaves it reads (shape, device, dtype) in
   ``Leaves.take``: metadata only. Timed on the 148-tensor GPT-2 medium tree with tiny
   tensors (the checks do not depend on tensor sizes), as the difference with the checks
   switched off, and set against a full ``chain(clip_by_norm, adam)`` update on the real
   sizes.
2. Transactions. ``ChainedOptimizer(transactional=True)`` copies the parameters and the
   wrapped optimizer's state before each applied step, to undo a step that raises. Timed
   against ``transactional=False`` on the same parameters, alternating round by round.

Usage::

    python benchmarks/reliability_overhead.py              # small and medium sets
    python benchmarks/reliability_overhead.py --sets small --rounds 5
    python benchmarks/reliability_overhead.py --smoke      # tiny, one round (CI)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gradchain as gc
from gradchain.tree import Leaves, flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import SETS, fresh_grads, gpt2_params  # noqa: E402


def _median_us(fn: Callable[[], object], rounds: int, inner: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e6


def validation(set_name: str, rounds: int) -> None:
    shapes = gpt2_params(**SETS[set_name])
    tiny = {k: torch.zeros(1) for k in shapes}  # same tree, sizes do not matter here
    grads = {k: torch.ones(1) for k in shapes}
    n = len(flatten(grads)[0])
    inner = 200

    def leaves_checked() -> object:
        return Leaves(grads)

    def leaves_flat_only() -> object:
        leaves, _ = flatten(grads)
        index = [i for i, g in enumerate(leaves) if g is not None]
        return [leaves[i] for i in index]

    view = Leaves(grads)
    t_init = _median_us(leaves_checked, rounds, inner) - _median_us(
        leaves_flat_only, rounds, inner
    )
    t_take = _median_us(lambda: view.take(tiny), rounds, inner) - _median_us(
        lambda: view.take(tiny, check=False), rounds, inner
    )
    # chain(clip_by_norm, adam) builds Leaves 3 times (clip, scale_by_adam, the lr scale)
    # and takes 2 state trees (mu, nu).
    per_update = 3 * t_init + 2 * t_take
    params = {k: v.clone() for k, v in shapes.items()}
    real_grads = fresh_grads(params)
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adam(1e-3))
    state = tx.init(params)
    t_update = _median_us(lambda: tx.update(real_grads, state, params), rounds, 3)
    print(
        f"validation [{set_name}, {n} leaves]: Leaves checks {t_init:.1f} us "
        f"({t_init * 1e3 / n:.0f} ns/leaf), take checks {t_take:.1f} us "
        f"({t_take * 1e3 / n:.0f} ns/leaf); chain(clip_by_norm, adam) update "
        f"{t_update / 1e3:.2f} ms, of which checks ~{per_update:.0f} us "
        f"({100 * per_update / t_update:.2f}%)"
    )


def transactions(set_name: str, rounds: int) -> None:
    shapes = gpt2_params(**SETS[set_name])
    grads = fresh_grads(shapes)
    for label, make in (
        ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
        ("SGD(momentum)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
    ):
        runs = {}
        for transactional in (False, True):
            params = [torch.nn.Parameter(v.clone()) for v in shapes.values()]
            opt = gc.ChainedOptimizer(
                make(params), gc.clip_by_norm(1.0), transactional=transactional
            )

            def step(params: list = params, opt: gc.ChainedOptimizer = opt) -> None:
                for p, g in zip(params, grads.values()):
                    p.grad = g
                opt.step()

            step()  # lazy state init
            runs[transactional] = step
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for transactional in (False, True):
                t0 = time.perf_counter()
                runs[transactional]()
                times[transactional].append(time.perf_counter() - t0)
        off, on = (statistics.median(times[k]) * 1e3 for k in (False, True))
        n = sum(v.numel() for v in shapes.values())
        copied = n * 4 * (3 if label == "Adam" else 2)
        print(
            f"transactional [{set_name}, {n / 1e6:.1f}M params, {label}]: step "
            f"{off:.2f} ms -> {on:.2f} ms (x{on / off:.2f}); copy of "
            f"{copied / 2**20:.0f} MiB (params + optimizer state)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["small", "medium"], choices=list(SETS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets, rounds = (["tiny"], 1) if args.smoke else (args.sets, args.rounds)
    for name in sets:
        validation(name, rounds)
        transactions(name, rounds)


if __name__ == "__main__":
    main()
