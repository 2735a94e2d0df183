"""How long torch.compile takes on a gradchain step, next to compiling torch's own step.

Each case runs in its own process with an empty inductor cache (cold compile, no warm
in-process caches), on the GPT-2-style parameter sets of ``speed.py``:

- ``torch``: ``torch.compile`` of ``clip_grad_norm_(foreach=True)`` + ``AdamW.step`` (the
  recipe of torch's "compiling the optimizer" tutorial);
- ``plain``: ``chain(clip_by_norm(1.0), adamw(1e-3))``, pure ``update`` +
  ``apply_updates``, ``torch.compile(fullgraph=True)``;
- ``gates``: ``chain(skip_if_nonfinite(), accumulate_every(2), clip_by_norm(1.0),
  adamw(1e-3))``, the same way;
- ``gates-inplace``: the gates chain through ``update_and_apply_`` (params and state
  written in place), ``fullgraph=True``.

It prints the first call (trace + inductor codegen + C++ build) and the median step
afterwards, and the eager ``AdamW(fused=True)`` step for reference.

Usage::

    python benchmarks/compile_time.py                       # small set (a few minutes)
    python benchmarks/compile_time.py --sets small medium   # medium: ~15 minutes on 2 cores
    python benchmarks/compile_time.py --smoke               # tiny set, plain only (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

CASES = ("torch", "plain", "gates", "gates-inplace")


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_case(case: str, set_name: str, steps: int) -> dict[str, float]:
    """Compile and time one case in this process (called in a fresh subprocess)."""
    import torch
    from speed import SETS, fresh_grads, gpt2_params

    import gradchain as gc

    torch.set_num_threads(1)
    params = gpt2_params(**SETS[set_name])
    grads = fresh_grads(params)
    step: Callable[[], Any]
    if case in ("torch", "fused"):
        t_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for p, g in zip(t_params, grads.values()):
            p.grad = g.clone()
        opt = torch.optim.AdamW(t_params, lr=1e-3, fused=case == "fused")

        def torch_step() -> None:
            torch.nn.utils.clip_grad_norm_(t_params, 1.0, foreach=True)
            opt.step()

        step = torch_step if case == "fused" else torch.compile(torch_step)
    else:
        members = [gc.clip_by_norm(1.0), gc.adamw(1e-3)]
        if case != "plain":
            members = [gc.skip_if_nonfinite(), gc.accumulate_every(2), *members]
        tx = gc.chain(*members)
        box: dict[str, Any] = {"p": {k: v.clone() for k, v in params.items()},
                               "s": tx.init(params)}
        if case == "gates-inplace":
            inplace = torch.compile(lambda g, s, p: gc.update_and_apply_(tx, g, s, p),
                                    fullgraph=True)

            def inplace_step() -> None:
                box["s"] = inplace(grads, box["s"], box["p"])

            step = inplace_step
        else:
            def pure(g: Any, s: Any, p: Any) -> Any:
                u, s = tx.update(g, s, p)
                return gc.apply_updates(p, u), s

            compiled = torch.compile(pure, fullgraph=True)

            def pure_step() -> None:
                box["p"], box["s"] = compiled(grads, box["s"], box["p"])

            step = pure_step
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    return {"first_s": first, "step_ms": _median_ms(step, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["small"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny set, plain only, 1 step")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child[0], args.child[1], args.steps)))
        return
    sets = ["tiny"] if args.smoke else args.sets
    cases = ["plain"] if args.smoke else args.cases
    steps = 1 if args.smoke else args.steps
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"{'set':7} {'case':14} {'first call s':>12} {'step ms':>9}")
    for set_name in sets:
        results = {}
        for case in [*cases, "fused"]:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="gc-ind-"))
            out = subprocess.run(
                [sys.executable, os.path.join(here, "compile_time.py"), "--child", case,
                 set_name, "--steps", str(steps)],
                env=env, cwd=here, capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                sys.exit(f"{case} on {set_name} failed:\n{out.stderr[-3000:]}")
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[case]
            label = "fused (eager)" if case == "fused" else case
            first = "-" if case == "fused" else f"{r['first_s']:.1f}"
            print(f"{set_name:7} {label:14} {first:>12} {r['step_ms']:9.2f}", flush=True)
        if "torch" in results:
            base = results["torch"]["first_s"]
            ratios = ", ".join(f"{c} {results[c]['first_s'] / base:.2f}"
                               for c in cases if c != "torch")
            print(f"{set_name:7} compile time / torch's: {ratios}")
    if args.smoke:
        print("smoke run: sizes are tiny, the figures mean nothing")


if __name__ == "__main__":
    main()
