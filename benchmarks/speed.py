"""gradchain against the torch-native code users would write instead, measured side by side.

One process times both on the same tensors, alternating them round by round, and prints
medians, ratios (gradchain / torch; below 1 means gradchain is faster) and peak extra memory
(from the torch profiler's allocation events). Parameter sets are GPT-2-style decoders:

    small:  2 layers, width 128, vocab 1024, context 128   (28 tensors, ~0.5M parameters)
    medium: 12 layers, width 512, vocab 8192, context 512  (148 tensors, ~42M parameters)

After the rows of the small set come the per-call lines for the fused clip + adamw step:
gradchain's, torch's, and a *floor*: the same kernels issued by straight-line code over
prepared lists (no trees, no checks, no state), what any Python step issuing them costs.

Usage::

    python benchmarks/speed.py                    # both sets, all rows
    python benchmarks/speed.py --sets small --rounds 30
    python benchmarks/speed.py --smoke            # tiny set, one round: checks it runs (CI)
    python benchmarks/speed.py --sets small --only-rules   # rows 7: the other torch.optim rules
    python benchmarks/speed.py --rows 4           # only the rows whose name starts with "4"
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

import gradchain as gc

SETS = {
    "tiny": dict(layers=1, width=16, vocab=64, context=16),
    "small": dict(layers=2, width=128, vocab=1024, context=128),
    "medium": dict(layers=12, width=512, vocab=8192, context=512),
}


def gpt2_params(layers: int, width: int, vocab: int, context: int) -> dict[str, torch.Tensor]:
    """The parameter shapes of a GPT-2-style decoder (weights as (in, out), biases)."""
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, width), "wpe": (context, width)}
    for i in range(layers):
        p = f"h{i}."
        shapes.update(
            {
                p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                p + "attn.c_attn.weight": (width, 3 * width), p + "attn.c_attn.bias": (3 * width,),
                p + "attn.c_proj.weight": (width, width), p + "attn.c_proj.bias": (width,),
                p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                p + "mlp.c_fc.weight": (width, 4 * width), p + "mlp.c_fc.bias": (4 * width,),
                p + "mlp.c_proj.weight": (4 * width, width), p + "mlp.c_proj.bias": (width,),
            }
        )
    shapes.update({"ln_f.weight": (width,), "ln_f.bias": (width,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def fresh_grads(params: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in params.items()}


@dataclass
class Row:
    name: str
    ours: Callable[[], object]
    theirs: Callable[[], object]
    note: str = ""


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of (allocated - freed) CPU bytes during one call, from the profiler's events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    # Allocations are the ops' *self* memory (children report theirs), frees are the
    # negative "[memory]" events.
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    level = peak = 0
    for _, delta in deltas:
        level += delta
        peak = max(peak, level)
    return peak


class _TorchCalls(TorchFunctionMode):
    """Records the torch calls a function makes from Python (ops, factories, tensor
    methods; not attribute reads such as ``.shape``), with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable[..., object], tuple[object, ...], dict[str, object]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") != "__get__":
            self.calls.append((func, args, kwargs))
        return out


def python_us_per_call(fn: Callable[[], object], calls: int, rounds: int) -> tuple[float, float, int]:
    """(host, Python, torch calls) per call, microseconds: ``fn``'s thread CPU time, and
    that minus the time of replaying, in a bare loop, the torch calls one call of ``fn``
    makes (recorded with a ``TorchFunctionMode``, replayed on the same tensors). What is
    left is the Python around the ops: the work of a step that a GPU user pays on top of
    the kernel launches. (The profiler's op durations include its own per-op overhead,
    which made a wall-minus-ops figure swing by +-60 us from run to run.)

    The step and the replay alternate round by round, and the Python figure is the median
    of the rounds' differences: timed one after the other, a change of load between the
    two made the difference swing by +-100 us on a shared machine (once below zero)."""
    for _ in range(3):
        fn()
    recorder = _TorchCalls()
    with recorder:
        fn()
    recorded = recorder.calls

    def replay() -> None:
        for func, args, kwargs in recorded:
            func(*args, **kwargs)

    steps, diffs = [], []
    for _ in range(rounds):
        step = host_us_per_call(fn, calls, 1)
        steps.append(step)
        diffs.append(step - host_us_per_call(replay, calls, 1))
    return min(steps), statistics.median(diffs), len(recorded)


def host_us_per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Thread CPU microseconds per call, the minimum over ``rounds`` rounds of ``calls``."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e6


def timed(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(row: Row, rounds: int, inner: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        row.ours()
        row.theirs()
    ours, theirs, ratios = [], [], []
    for r in range(rounds):
        # Alternate which goes first, so drift and cache effects fall on both.
        if r % 2:
            a = timed(row.ours, inner)
            b = timed(row.theirs, inner)
        else:
            b = timed(row.theirs, inner)
            a = timed(row.ours, inner)
        ours.append(a)
        theirs.append(b)
        ratios.append(a / b)
    return {
        "ours_ms": statistics.median(ours) * 1e3,
        "torch_ms": statistics.median(theirs) * 1e3,
        "ratio": statistics.median(ratios),
        "ours_peak_mb": peak_extra_bytes(row.ours) / 2**20,
        "torch_peak_mb": peak_extra_bytes(row.theirs) / 2**20,
    }


def straight_line_step(params: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The floor for "python per call": the kernels gradchain's fused clip + adamw step
    issues (leaf norms, their norm, the coefficient, one in-place multiply, the step count,
    ``_fused_adamw_``), as straight-line code over lists made once: no trees, no checks,
    no state rebuilt. What any step issuing these kernels from Python costs at least."""
    ps = [p.clone() for p in params.values()]
    gs = [g.clone() for g in fresh_grads(params).values()]
    mus = [torch.zeros_like(p) for p in ps]
    nus = [torch.zeros_like(p) for p in ps]
    count = [torch.zeros((), dtype=torch.int64)]

    def step() -> None:
        norms = torch._foreach_norm(gs, 2.0, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        torch._foreach_mul_(gs, torch.clamp(1.0 / (total + 1e-6), max=1.0))
        count[0] = torch.clamp(count[0], max=2**62) + 1
        step_t = count[0].to(torch.float32)
        torch._fused_adamw_(ps, gs, mus, nus, [], [step_t] * len(ps), lr=1e-3, beta1=0.9,
                            beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False,
                            maximize=False)

    return step


def build_rows(params: dict[str, torch.Tensor], compile_row3: bool) -> list[Row]:
    rows: list[Row] = []
    grads = fresh_grads(params)

    # 1. clip_by_norm vs clip_grad_norm_(foreach=True)
    clip = gc.clip_by_norm(1.0)
    clip_state = clip.init(params)
    t_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(t_params, grads.values()):
        p.grad = g.clone()
    rows.append(Row(
        "1 clip_by_norm",
        lambda: clip.update(grads, clip_state),
        lambda: torch.nn.utils.clip_grad_norm_(t_params, 1.0, foreach=True),
    ))

    clip_donor = {k: g.clone() for k, g in grads.items()}
    rows.append(Row(
        "1' clip_by_norm donated",
        lambda: clip.update(clip_donor, clip_state, donate=True),
        lambda: torch.nn.utils.clip_grad_norm_(t_params, 1.0, foreach=True),
        "donate=True: in place, as clip_grad_norm_",
    ))

    # 2. chain(clip, adamw) + apply_updates (pure) vs clip + AdamW(foreach=True)
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-3))
    box = {"params": dict(params), "state": tx.init(params)}

    def pure_step() -> None:
        updates, box["state"] = tx.update(grads, box["state"], box["params"])
        box["params"] = gc.apply_updates(box["params"], updates)

    opt_foreach = torch.optim.AdamW(t_params, lr=1e-3, foreach=True)

    def torch_foreach_step() -> None:
        torch.nn.utils.clip_grad_norm_(t_params, 1.0, foreach=True)
        opt_foreach.step()

    rows.append(Row("2 clip+adamw pure", pure_step, torch_foreach_step))

    # 3. the fastest path gradchain offers vs clip + AdamW(fused=True)
    f_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(f_params, grads.values()):
        p.grad = g.clone()
    opt_fused = torch.optim.AdamW(f_params, lr=1e-3, fused=True)

    def torch_fused_step() -> None:
        torch.nn.utils.clip_grad_norm_(f_params, 1.0, foreach=True)
        opt_fused.step()

    live = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    fast = {"state": tx.init(params)}
    # Donation gives up the gradients, as clip_grad_norm_ does: hand in a fresh copy's
    # memory each step (the copy is refreshed outside the timed call, like backward would).
    donor = {k: g.clone() for k, g in grads.items()}

    def eager_inplace_step() -> None:
        with torch.no_grad():
            updates, fast["state"] = tx.update(donor, fast["state"], live, donate=True)
            gc.apply_updates_(live, updates)

    rows.append(Row("3 clip+adamw donated", eager_inplace_step, torch_fused_step,
                    "eager, donate=True + apply_updates_"))
    fused_live = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    fused_box = {"state": tx.init(params)}
    fused_donor = {k: g.clone() for k, g in grads.items()}

    def fused_inplace_step() -> None:
        fused_box["state"] = gc.update_and_apply_(tx, fused_donor, fused_box["state"], fused_live)

    rows.append(Row("3 clip+adamw fused", fused_inplace_step, torch_fused_step,
                    "update_and_apply_ (torch's fused kernel)"))

    # 3'. the same with a no-decay partition vs AdamW(fused) with two param groups
    labels = {k: "decay" if p.ndim == 2 else "no_decay" for k, p in params.items()}
    nd_tx = gc.chain(gc.clip_by_norm(1.0), gc.partition(
        {"decay": gc.adamw(1e-3, weight_decay=0.1), "no_decay": gc.adamw(1e-3, weight_decay=0.0)},
        labels,
    ))
    nd_live = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    nd_box = {"state": nd_tx.init(params)}
    nd_donor = {k: g.clone() for k, g in grads.items()}
    g_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(g_params, grads.values()):
        p.grad = g.clone()
    keys = list(params)
    groups_opt = torch.optim.AdamW(
        [{"params": [p for k, p in zip(keys, g_params) if labels[k] == "decay"],
          "weight_decay": 0.1},
         {"params": [p for k, p in zip(keys, g_params) if labels[k] == "no_decay"],
          "weight_decay": 0.0}],
        lr=1e-3, fused=True,
    )

    def nd_step() -> None:
        nd_box["state"] = gc.update_and_apply_(nd_tx, nd_donor, nd_box["state"], nd_live)

    def torch_groups_step() -> None:
        torch.nn.utils.clip_grad_norm_(g_params, 1.0, foreach=True)
        groups_opt.step()

    rows.append(Row("3' no-decay partition fused", nd_step, torch_groups_step,
                    "vs AdamW(fused) with two param groups"))
    if compile_row3:
        # The compiled in-place step: update_and_apply_ traced with fullgraph=True writes the
        # new params and state into the old tensors (inductor computes them in place).
        cparams = {k: p.clone() for k, p in params.items()}
        compiled = torch.compile(lambda g, s, p: gc.update_and_apply_(tx, g, s, p),
                                 fullgraph=True)
        cbox = {"state": tx.init(params)}
        cdonor = {k: g.clone() for k, g in grads.items()}

        def compiled_step() -> None:
            cbox["state"] = compiled(cdonor, cbox["state"], cparams)

        t0 = time.perf_counter()
        compiled_step()
        compile_s = time.perf_counter() - t0
        rows.append(Row("3 clip+adamw compiled", compiled_step, torch_fused_step,
                        f"update_and_apply_ compiled in {compile_s:.0f}s"))

    # 4. ChainedOptimizer(AdamW(fused), clip) vs clip + AdamW(fused)
    a_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    # Two gradient sets, alternated (on both sides): as in training, each step sees new
    # .grad tensors (the adapter warns about a step on the last step's untouched ones).
    a_grads = [[g.clone() for g in grads.values()] for _ in range(2)]
    chained = gc.ChainedOptimizer(torch.optim.AdamW(a_params, lr=1e-3, fused=True),
                                  gc.clip_by_norm(1.0))
    turn = {"ours": 0, "torch": 0}

    def adapter_step() -> None:
        turn["ours"] ^= 1
        for p, g in zip(a_params, a_grads[turn["ours"]]):
            p.grad = g
        chained.step()

    def torch_fused_step_regrad() -> None:
        turn["torch"] ^= 1
        for p, g in zip(f_params, a_grads[turn["torch"]]):
            p.grad = g
        torch_fused_step()

    rows.append(Row("4 ChainedOptimizer", adapter_step, torch_fused_step_regrad,
                    "default (transactional=False; donates .grad)"))

    b_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    b_grads = [[g.clone() for g in grads.values()] for _ in range(2)]
    safe_chained = gc.ChainedOptimizer(torch.optim.AdamW(b_params, lr=1e-3, fused=True),
                                       gc.clip_by_norm(1.0), transactional=True)

    def safe_adapter_step() -> None:
        turn["safe"] = turn.get("safe", 0) ^ 1
        for p, g in zip(b_params, b_grads[turn["safe"]]):
            p.grad = g
        safe_chained.step()

    rows.append(Row("4' ChainedOptimizer", safe_adapter_step, torch_fused_step_regrad,
                    "transactional=True (snapshot per step)"))

    # 5. accumulate_every(4) micro-step that does not close vs one _foreach_add_
    acc = gc.accumulate_every(4)
    acc_state = acc.init(params)
    buf = [torch.zeros_like(p) for p in params.values()]
    glist = list(grads.values())
    rows.append(Row(
        "5 accumulate micro-step",
        lambda: acc.update(grads, acc_state),  # mini_step 0 -> 1: never closes
        lambda: torch._foreach_add_(buf, glist),
        "pure",
    ))
    acc_box = {"state": acc.init(params)}
    acc_donor = {k: g.clone() for k, g in grads.items()}

    def donated_micro_step() -> None:
        # Keep the window open: a micro-step that closes is not what this row measures.
        acc_box["state"] = acc_box["state"]._replace(mini_step=torch.zeros((), dtype=torch.int64))
        _, acc_box["state"] = acc.update(acc_donor, acc_box["state"], donate=True)

    rows.append(Row("5' accumulate micro-step", donated_micro_step,
                    lambda: torch._foreach_add_(buf, glist), "donate=True"))

    # 6. loss_scale update vs GradScaler.unscale_ + update
    ls = gc.loss_scale()
    ls_box = {"state": ls.init(params)}
    scaled = fresh_grads(params, scale=2.0**16)
    s_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    s_opt = torch.optim.SGD(s_params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # create its scale tensor

    def ours_ls() -> None:
        _, ls_box["state"] = ls.update(scaled, ls_box["state"])

    def torch_ls() -> None:
        for p, g in zip(s_params, scaled.values()):
            p.grad = g.clone()  # unscale_ is in place; give it scaled grads each time
        scaler.unscale_(s_opt)
        scaler.update()

    def torch_clone_only() -> None:
        for p, g in zip(s_params, scaled.values()):
            p.grad = g.clone()

    rows.append(Row("6 loss_scale", ours_ls, torch_ls, "pure; torch side re-clones grads"))
    ls_donor = {k: g.clone() for k, g in scaled.items()}
    ls_fast = {"state": ls.init(params)}

    def ours_ls_donated() -> None:
        # Unscaled in place, as GradScaler.unscale_: the memory is reused, the values are
        # re-scaled each time by the same power of two (exact), like torch_ls's re-clone.
        for k, g in ls_donor.items():
            g.copy_(scaled[k])
        _, ls_fast["state"] = ls.update(ls_donor, ls_fast["state"], donate=True)

    for p, g in zip(s_params, scaled.values()):
        p.grad = g.clone()

    def torch_ls_copy() -> None:
        for p, g in zip(s_params, scaled.values()):
            p.grad.copy_(g)  # type: ignore[union-attr]
        scaler.unscale_(s_opt)
        scaler.update()

    rows.append(Row("6 loss_scale donated", ours_ls_donated, torch_ls_copy,
                    "both sides re-copy scaled grads"))
    rows.append(Row("6' (clone cost alone)", torch_clone_only, torch_clone_only, "reference"))
    return rows


# 7. every other torch.optim algorithm: update_and_apply_ (torch's own kernel through the
# binding) vs the torch optimizer with the fastest flags it offers here.
RULES = [
    ("adagrad", "Adagrad", {"fused": True}),
    ("adadelta", "Adadelta", {"foreach": True}),
    ("adamax", "Adamax", {"foreach": True}),
    ("nadam", "NAdam", {"foreach": True}),
    ("radam", "RAdam", {"foreach": True}),
    ("rmsprop", "RMSprop", {"foreach": True}),
    ("rprop", "Rprop", {"foreach": True}),
    ("asgd", "ASGD", {"foreach": True}),
    ("adafactor", "Adafactor", {"foreach": True}),
    ("muon", "Muon", {}),
]


def rule_rows(params: dict[str, torch.Tensor]) -> list[Row]:
    rows: list[Row] = []
    grads = fresh_grads(params, 1e-2)
    for name, cls_name, flags in RULES:
        # Muon takes the 2-D parameters only (the others go to another rule).
        ps = {k: v for k, v in params.items() if name != "muon" or v.dim() == 2}
        gs = {k: grads[k] for k in ps}
        tx = getattr(gc, name)(lr=1e-3)
        live = {k: p.clone() for k, p in ps.items()}
        box = {"state": tx.init(live)}

        def ours(tx: gc.GradientTransformation = tx, gs: dict = gs, live: dict = live,
                 box: dict = box) -> None:
            box["state"] = gc.update_and_apply_(tx, gs, box["state"], live)

        t_params = [torch.nn.Parameter(p.clone()) for p in ps.values()]
        for p, g in zip(t_params, gs.values()):
            p.grad = g.clone()
        opt = getattr(torch.optim, cls_name)(t_params, lr=1e-3, **flags)
        flag = ", ".join(f"{k}=True" for k in flags) or "its only implementation"
        rows.append(Row(f"7 {name}", ours, opt.step, f"update_and_apply_ vs {cls_name}({flag})"))
    return rows


def optax_rows(params: dict[str, torch.Tensor], compiled: bool) -> list[Row]:
    """Row 2x: the pure clip + adamw step (``update`` + ``apply_updates``) against optax's
    jitted, donated ``clip_by_global_norm`` + ``adamw`` step on the same shapes (CPU, XLA);
    with ``compiled``, row 2xc: the same pure step under ``torch.compile``. No rows when
    jax/optax are not installed."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return []
    jax.config.update("jax_platforms", "cpu")
    tx = gc.chain(gc.clip_by_norm(1.0), gc.adamw(1e-3))
    grads = fresh_grads(params)
    box = {"params": dict(params), "state": tx.init(params)}

    def ours() -> None:
        updates, box["state"] = tx.update(grads, box["state"], box["params"])
        box["params"] = gc.apply_updates(box["params"], updates)

    otx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-2))
    jparams = {k: jnp.asarray(v.numpy()) for k, v in params.items()}
    jgrads = {k: jnp.asarray(v.numpy()) for k, v in grads.items()}
    jbox = {"params": jparams, "state": otx.init(jparams)}

    def step(p: object, s: object, g: object) -> object:
        u, s = otx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def theirs() -> None:
        jbox["params"], jbox["state"] = jitted(jbox["params"], jbox["state"], jgrads)
        jax.block_until_ready(jbox["params"])

    theirs()  # compile outside the timing
    rows = [Row("2x clip+adamw pure vs optax", ours, theirs, "optax jitted, donated (XLA CPU)")]
    if compiled:
        # The like-for-like comparison: the same pure step, compiled (as jit compiles optax's).
        def pure(g: object, s: object, p: object) -> object:
            updates, s = tx.update(g, s, p)
            return gc.apply_updates(p, updates), s

        step_c = torch.compile(pure, fullgraph=True)
        cbox = {"params": dict(params), "state": tx.init(params)}

        def ours_c() -> None:
            cbox["params"], cbox["state"] = step_c(grads, cbox["state"], cbox["params"])

        t0 = time.perf_counter()
        ours_c()
        rows.append(Row("2xc clip+adamw pure compiled", ours_c, theirs,
                        f"torch.compile (compiled in {time.perf_counter() - t0:.0f}s) vs optax jit"))
    return rows


def run_rows(set_name: str, rows: list[Row], only: list[str] | None, rounds: int, inner: int,
             smoke: bool) -> None:
    """Measure and print ``rows`` (those whose name starts with one of ``only``, if given)."""
    for row in rows:
        if only and not any(row.name.split(" ")[0] == r for r in only):
            continue
        m = measure(row, rounds=rounds, inner=inner, warmup=0 if smoke else 2)
        print(f"{set_name:7} {row.name:28} {m['ours_ms']:12.3f} {m['torch_ms']:9.3f} "
              f"{m['ratio']:6.2f} {m['ours_peak_mb']:8.1f} / {m['torch_peak_mb']:<8.1f}  "
              f"{row.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["small", "medium"], choices=list(SETS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add the compiled rows 3 and 2xc")
    parser.add_argument("--smoke", action="store_true", help="tiny set, 1 round, no timing claims")
    parser.add_argument("--rules", action="store_true",
                        help="add rows 7: every other torch.optim algorithm (always in --smoke)")
    parser.add_argument("--only-rules", action="store_true", help="rows 7 only")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only rows whose name starts with one of these (e.g. 4 \"4'\")")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = ["tiny"] if args.smoke else args.sets
    rounds = 1 if args.smoke else args.rounds
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rounds {rounds}")
    header = f"{'set':7} {'row':28} {'gradchain ms':>12} {'torch ms':>9} {'ratio':>6} " \
             f"{'peak MB ours/torch':>19}  note"
    print(header)
    print("-" * len(header))
    optax_sets = []
    for name in sets:
        params = gpt2_params(**SETS[name])
        n = sum(p.numel() for p in params.values())
        inner = 1 if args.smoke else (20 if name == "small" else 3)
        rows = [] if args.only_rules else build_rows(params, compile_row3=args.compile)
        if args.rules or args.only_rules or args.smoke:
            rows += rule_rows(params)
        run_rows(name, rows, args.rows, rounds, inner, args.smoke)
        if name != "medium":
            # Python per call: what a GPU user pays on every step (launch-bound kernels).
            by_name = {row.name: row for row in build_rows(params, compile_row3=False)}
            fused_row = by_name["3 clip+adamw fused"]
            calls = 5 if args.smoke else 200
            floor = straight_line_step(params)
            for who, fn in (("gradchain", fused_row.ours), ("torch", fused_row.theirs),
                            ("floor", floor)):
                host, py, n_calls = python_us_per_call(fn, calls, 1 if args.smoke else 15)
                print(f"{name:7} python per call, clip+adamw fused step, {who:9}: "
                      f"{py:7.1f} us of {host:7.1f} us ({n_calls} torch calls)")
            # The same step on one-element leaves of the same 28-leaf tree: the kernels do
            # next to nothing, so this is the host's work per call (Python and torch's op
            # dispatch), timed in thread CPU time (minimum of rounds: steady under load).
            tiny_rows = build_rows({k: torch.randn(1) for k in params}, compile_row3=False)
            tiny = {row.name: row for row in tiny_rows}["3 clip+adamw fused"]
            tiny_floor = straight_line_step({k: torch.randn(1) for k in params})
            for who, fn in (("gradchain", tiny.ours), ("torch", tiny.theirs),
                            ("floor", tiny_floor)):
                host = host_us_per_call(fn, 20 if args.smoke else 200, 1 if args.smoke else 15)
                print(f"{name:7} host per call, 1-element leaves,       {who:9}: {host:7.1f} us")
        print(f"({name}: {len(params)} tensors, {n / 1e6:.2f}M parameters)")
        if not (args.only_rules or args.smoke) and (
            args.rows is None or any(r.startswith("2x") for r in args.rows)
        ):
            optax_sets.append((name, params, inner))
    # Rows 2x/2xc last, after every torch-only row, and only when selected: importing jax
    # starts XLA's CPU runtime (its thread pools) in this process, which has no place in the
    # torch-against-torch timings.
    for name, params, inner in optax_sets:
        run_rows(name, optax_rows(params, compiled=args.compile), args.rows, rounds, inner, False)
    if args.smoke:
        print("smoke run: sizes are tiny, the figures mean nothing")


if __name__ == "__main__":
    main()
