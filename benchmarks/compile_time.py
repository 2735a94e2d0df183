"""How long torch.compile takes on a gradchain step, and how fast the compiled step runs,
next to torch's own compiled clip + AdamW step.

Each case runs in its own process (cold: empty inductor cache, nothing compiled before),
with one thread, inductor compiling in-process (``TORCHINDUCTOR_COMPILE_THREADS=1``) and,
with ``--cpu N``, pinned to one core, on the GPT-2-style parameter sets of ``speed.py``:

- ``torch``: ``torch.compile`` of ``clip_grad_norm_(foreach=True)`` + ``AdamW.step`` (the
  recipe of torch's "compiling the optimizer" tutorial, which compiles without
  ``fullgraph``; torch's step is two graphs);
- ``plain``: ``chain(clip_by_norm(1.0), adamw(1e-3))``, pure ``update`` +
  ``apply_updates``, ``torch.compile(fullgraph=True)``;
- ``skip``, ``accum``, ``scale``: the same chain behind ``skip_if_nonfinite()``,
  ``accumulate_every(4)`` or ``loss_scale()``;
- ``gates``: behind ``skip_if_nonfinite()`` and ``accumulate_every(2)``;
- ``gates-inplace``: the ``gates`` chain through ``update_and_apply_``, ``fullgraph=True``.

Per case it prints: the first call (trace + inductor codegen + C++ build) as wall and as
CPU seconds (this process and its compiler subprocesses: robust to other load on the
machine), whether any later call compiled again (calls cover closed and applied steps),
the kernels inductor generated (C++ kernels, their loops, extern calls such as
``_foreach_norm``), and the steady-state step (median over ``--steps`` calls, wall and
thread CPU milliseconds; a gated chain's figure is the mean over its window). The eager
``AdamW(fused=True)`` step is printed for reference. ``--repeat`` runs every case that
many times, interleaved, and prints ranges.

Usage::

    python benchmarks/compile_time.py --cpu 0                 # small set, all cases
    python benchmarks/compile_time.py --cases torch gates --repeat 3
    python benchmarks/compile_time.py --smoke                 # tiny set, plain only (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

CASES = ("torch", "plain", "skip", "accum", "scale", "gates", "gates-inplace")
WINDOW = {"accum": 4, "gates": 2, "gates-inplace": 2}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _count_code(codes: list[str]) -> dict[str, int]:
    code = "\n".join(codes)
    return {
        "kernels": len(re.findall(r"^cpp_fused_\w+ = async_compile", code, re.M)),
        "loops": code.count("for(int64_t"),
        "externs": len(re.findall(r"= torch\.ops\.aten\.\w+", code)),
        "code_kb": len(code) // 1024,
    }


def run_case(case: str, set_name: str, steps: int) -> dict[str, Any]:
    """Compile and time one case in this process (called in a fresh subprocess)."""
    import torch
    from speed import SETS, fresh_grads, gpt2_params
    from torch._inductor.utils import run_and_get_code

    import gradchain as gc

    torch.set_num_threads(1)
    params = gpt2_params(**SETS[set_name])
    grads = fresh_grads(params)
    step: Callable[[], Any]
    compiled: Callable[..., Any]
    if case in ("torch", "fused"):
        t_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
        for p, g in zip(t_params, grads.values()):
            p.grad = g.clone()
        opt = torch.optim.AdamW(t_params, lr=1e-3, fused=case == "fused")

        def torch_step() -> None:
            torch.nn.utils.clip_grad_norm_(t_params, 1.0, foreach=True)
            opt.step()

        if case == "fused":
            step = torch_step
            first = lambda: torch_step()  # noqa: E731
        else:
            compiled = torch.compile(torch_step)
            step = compiled
            first = lambda: run_and_get_code(compiled)  # noqa: E731
    else:
        members = [gc.clip_by_norm(1.0), gc.adamw(1e-3)]
        heads = {
            "plain": [],
            "skip": [gc.skip_if_nonfinite()],
            "accum": [gc.accumulate_every(WINDOW["accum"])],
            "scale": [gc.loss_scale()],
            "gates": [gc.skip_if_nonfinite(), gc.accumulate_every(WINDOW["gates"])],
            "gates-inplace": [gc.skip_if_nonfinite(), gc.accumulate_every(WINDOW["gates"])],
        }[case]
        tx = gc.chain(*heads, *members)
        box: dict[str, Any] = {"p": {k: v.clone() for k, v in params.items()},
                               "s": tx.init(params)}
        if case == "gates-inplace":
            compiled = torch.compile(lambda g, s, p: gc.update_and_apply_(tx, g, s, p),
                                     fullgraph=True)

            def inplace_step() -> None:
                box["s"] = compiled(grads, box["s"], box["p"])

            def inplace_first() -> Any:
                box["s"], codes = run_and_get_code(compiled, grads, box["s"], box["p"])
                return None, codes

            step, first = inplace_step, inplace_first
        else:
            def pure(g: Any, s: Any, p: Any) -> Any:
                u, s = tx.update(g, s, p)
                return gc.apply_updates(p, u), s

            compiled = torch.compile(pure, fullgraph=True)

            def pure_step() -> None:
                box["p"], box["s"] = compiled(grads, box["s"], box["p"])

            def pure_first() -> Any:
                (box["p"], box["s"]), codes = run_and_get_code(compiled, grads, box["s"],
                                                                box["p"])
                return None, codes

            step, first = pure_step, pure_first
    out: dict[str, Any] = {}
    if case != "fused":
        counters = torch._dynamo.utils.counters
        wall0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children_cpu()
        _, codes = first()
        out["first_s"] = time.perf_counter() - wall0
        out["first_cpu_s"] = time.process_time() - cpu0 + _children_cpu() - kids0
        graphs = counters["stats"]["unique_graphs"]
        out.update(_count_code(codes))
        # Closed and applied steps, and a few more: nothing may compile again.
        for _ in range(2 * WINDOW.get(case, 1) + 2):
            step()
        out["graphs"] = graphs
        out["recompiles"] = counters["stats"]["unique_graphs"] - graphs
    else:
        step()
    walls, cpus = [], []
    n = steps * WINDOW.get(case, 1)  # whole windows
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.thread_time()
        step()
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    out["step_ms"] = statistics.mean(sorted(walls)[: max(1, len(walls) * 3 // 4)]) * 1e3
    out["step_cpu_ms"] = statistics.mean(cpus) * 1e3
    return out


def _spawn(case: str, set_name: str, steps: int, cpu: int | None, here: str) -> dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="gc-ind-"),
               TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(here, "compile_time.py"), "--child", case, set_name,
           "--steps", str(steps)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, env=env, cwd=here, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{case} on {set_name} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _span(xs: list[float], fmt: str) -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(min(xs), fmt)}-{format(max(xs), fmt)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["small"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--steps", type=int, default=25, help="timed calls (x the window)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case, interleaved")
    parser.add_argument("--cpu", type=int, default=None, help="pin each case to this core")
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
    head = (f"{'set':6} {'case':14} {'first call s':>13} {'cpu s':>11} {'recomp':>6} "
            f"{'kernels':>7} {'loops':>5} {'extern':>6} {'step ms':>11} {'cpu ms':>11}")
    print(head)
    for set_name in sets:
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in [*cases, "fused"]}
        for _ in range(args.repeat):
            for case in runs:
                runs[case].append(_spawn(case, set_name, steps, args.cpu, here))
        for case, rs in runs.items():
            step = _span([r["step_ms"] for r in rs], ".2f")
            cpu_step = _span([r["step_cpu_ms"] for r in rs], ".2f")
            if case == "fused":
                print(f"{set_name:6} {'fused (eager)':14} {'-':>13} {'-':>11} {'':>6} {'':>7} "
                      f"{'':>5} {'':>6} {step:>11} {cpu_step:>11}")
                continue
            r0 = rs[0]
            print(
                f"{set_name:6} {case:14} {_span([r['first_s'] for r in rs], '.1f'):>13} "
                f"{_span([r['first_cpu_s'] for r in rs], '.1f'):>11} "
                f"{max(r['recompiles'] for r in rs):>6} {r0['kernels']:>7} {r0['loops']:>5} "
                f"{r0['externs']:>6} {step:>11} {cpu_step:>11}",
                flush=True,
            )
        if "torch" in runs:
            base_c = statistics.median(r["first_cpu_s"] for r in runs["torch"])
            base_s = statistics.median(r["step_cpu_ms"] for r in runs["torch"])
            for case in cases:
                if case == "torch":
                    continue
                c = statistics.median(r["first_cpu_s"] for r in runs[case]) / base_c
                s = statistics.median(r["step_cpu_ms"] for r in runs[case]) / base_s
                print(f"{set_name:6} {case:14} / torch's: compile (cpu) {c:.2f}, step (cpu) {s:.2f}")
    if args.smoke:
        print("smoke run: sizes are tiny, the figures mean nothing")


if __name__ == "__main__":
    main()
