"""mmengine-style recipe: gradient accumulation + clipping as mmengine's OptimWrapper does it.

mmengine configures them as

    optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.05, momentum=0.9),
                         accumulative_counts=4, clip_grad=dict(max_norm=1.0))

and the loop calls ``optim_wrapper.update_params(loss)``. With gradchain the same two
features are a chain in front of the same optimizer:

    ChainedOptimizer(SGD(lr=0.05, momentum=0.9),
                     chain(accumulate_every(4), clip_by_norm(1.0)))

and the loop is plain PyTorch: ``loss.backward()`` (no division by 4: the chain passes on
the window's mean), ``opt.step()``, ``opt.zero_grad()``.

To compare without installing mmengine, ``MMEngineOptimWrapper`` below is a short
stand-in with ``OptimWrapper``'s accumulation and clipping logic (mmengine 0.10: each loss
divided by ``accumulative_counts``, ``clip_grad_norm_`` before the step, ``zero_grad``
right after it). Four runs train the same model on the same batches:

* mmengine with ``initialize_count_status(model, 0, max_iters)`` (the Runner calls it):
  the last, short window steps, its losses divided by its true size;
* gradchain with ``opt.step(flush=True)`` on the last iteration: the same, without knowing
  ``max_iters`` in advance; the weights agree (to float32 rounding at most);
* mmengine without ``initialize_count_status``: the last window never steps and its
  gradients linger in ``.grad``;
* gradchain without ``flush``: the last window is not applied either; it waits in the
  chain's state (and in ``opt.state_dict()``), ready to be continued.

Run: ``python chains/mmengine_style.py`` (``--help`` for options); about a second of training.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

import gradchain as gc


class MMEngineOptimWrapper:
    """Stand-in for ``mmengine.optim.OptimWrapper(optimizer, accumulative_counts, clip_grad)``
    (accumulation and norm clipping only)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, accumulative_counts: int, clip_grad: dict
    ) -> None:
        self.optimizer, self.n, self.clip_grad = optimizer, accumulative_counts, clip_grad
        self.inner_count, self.max_counts, self.remainder = 0, -1, -1
        self.steps = 0

    def initialize_count_status(self, model: torch.nn.Module, init: int, max_counts: int) -> None:
        self.inner_count, self.max_counts = init, max_counts
        self.remainder = max_counts % self.n

    def update_params(self, loss: torch.Tensor) -> None:
        if self.max_counts == -1 or self.inner_count < self.max_counts - self.remainder:
            factor = self.n
        else:
            factor = self.remainder  # the last, short window: divided by its true size
        (loss / factor).backward()
        self.inner_count += 1
        if self.inner_count % self.n == 0 or self.inner_count == self.max_counts:
            params = [
                p
                for g in self.optimizer.param_groups
                for p in g["params"]
                if p.requires_grad and p.grad is not None
            ]
            torch.nn.utils.clip_grad_norm_(params, **self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.steps += 1


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150, help="max_iters (micro-batches)")
    parser.add_argument("--accumulative-counts", type=int, default=4)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, max_iters = args.accumulative_counts, args.iters

    torch.set_num_threads(1)  # a model this small gains nothing from more threads
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, len(x), (args.batch_size,), generator=gen) for _ in range(max_iters)
    ]

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    # mmengine: the wrapper divides the loss, counts iterations and decides when to step.
    def run_mmengine(initialize: bool) -> tuple[torch.nn.Module, MMEngineOptimWrapper]:
        model = make_model(args.seed)
        wrapper = MMEngineOptimWrapper(sgd(model), n, clip_grad=dict(max_norm=args.max_norm))
        if initialize:  # the Runner does this; without it the last short window never steps
            wrapper.initialize_count_status(model, 0, max_iters)
        for idx in batches:
            wrapper.update_params(F.cross_entropy(model(x[idx]), y[idx]))
        return model, wrapper

    # gradchain: the chain accumulates and clips; the loop stays plain PyTorch.
    def run(flush_last: bool) -> tuple[torch.nn.Module, gc.ChainedOptimizer, int]:
        model = make_model(args.seed)
        opt = gc.ChainedOptimizer(
            sgd(model), gc.chain(gc.accumulate_every(n), gc.clip_by_norm(args.max_norm))
        )
        steps = 0
        for it, idx in enumerate(batches, start=1):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step(flush=flush_last and it == max_iters)
            opt.zero_grad()  # every iteration: the open window lives in the chain's state
            steps += opt.last_step_applied
        return model, opt, steps

    mm, mm_wrapper = run_mmengine(initialize=True)
    mm_plain, mm_plain_wrapper = run_mmengine(initialize=False)
    flushed, flushed_opt, flushed_steps = run(flush_last=True)
    held, held_opt, held_steps = run(flush_last=False)

    def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    full, last = divmod(max_iters, n)
    print(
        f"max_iters={max_iters}, accumulative_counts={n}, clip_grad=dict(max_norm="
        f"{args.max_norm}): {full} full windows" + (f" and a last one of {last}" if last else "")
    )
    rows = [
        ("mmengine OptimWrapper + initialize_count_status", mm_wrapper.steps, mm),
        ("gradchain ChainedOptimizer, flush=True at the end", flushed_steps, flushed),
        ("mmengine OptimWrapper, not initialized", mm_plain_wrapper.steps, mm_plain),
        ("gradchain ChainedOptimizer, no flush", held_steps, held),
    ]
    print(f"{'run':<52}{'SGD steps':>10}{'max |w - w(row 1)|':>22}")
    for name, steps, model in rows:
        print(f"{name:<52}{steps:>10}{max_diff(model, mm):>22.1e}")
    pending = int(gc.tree_get(held_opt.tx_state, "mini_step"))
    if pending:
        print(
            f"without flush the last {pending} micro-batches wait in the chain state (saved by "
            "opt.state_dict()); mmengine leaves them in .grad"
        )
    norm = float(gc.tree_get(flushed_opt.tx_state, "norm"))
    print(
        f"grad_norm before clipping, last step: {norm:.4f} (mmengine logs it every step; "
        "here it is in the state: read it when you log)"
    )


if __name__ == "__main__":
    main()
