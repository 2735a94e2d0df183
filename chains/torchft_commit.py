"""torchft-style recipe: commit-gated optimizer steps, as torchft's OptimizerWrapper does them.

In fault-tolerant training (torchft) every step ends with a vote: ``manager.should_commit()``
is false when something went wrong during the step (a peer died during the all-reduce, a
replica is healing), and then the step must leave no trace. torchft's ``OptimizerWrapper``
skips ``optimizer.step()`` on a refusal; ``ChainedOptimizer`` takes the same vote through
``should_commit=...`` and puts gradient processing in front of it:

    ChainedOptimizer(AdamW(...), chain(skip_if_nonfinite(), clip_by_norm(1.0)),
                     should_commit=manager.should_commit)

* The vote is taken only on steps the chain applies: a step with nan gradients is skipped
  by the chain first and not put to the vote.
* A refusal discards the whole call: the weights, AdamW's state *and* the chain's state
  (its skip counters, the clip norm) stay exactly as before it. This script checks that on
  every refused step by comparing snapshots.
* ``opt.step_scheduler(sched)`` steps the LR schedule only on committed steps, so the
  schedule, AdamW's step count and the manager's step count agree.

``StandInManager`` stands in for ``torchft.Manager`` (which needs a lighthouse and several
processes): it refuses the votes you list, as a real one refuses when the step's
all-reduce failed. With torchft, pass ``should_commit=manager.should_commit`` and call
``manager.start_quorum()`` before each step (torchft's wrapper does it in ``zero_grad``).

Run: ``python chains/torchft_commit.py`` (``--help`` for options); a second or two of training.
"""

from __future__ import annotations

import argparse
import copy

import optree
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

import gradchain as gc


class StandInManager:
    """The part of ``torchft.Manager`` the optimizer wrapper uses: a quorum per step and a vote."""

    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse  # 1-based vote numbers to refuse
        self.quorums = self.votes = self.step = 0

    def start_quorum(self) -> None:
        self.quorums += 1

    def should_commit(self) -> bool:
        self.votes += 1
        ok = self.votes not in self.refuse
        self.step += ok
        return ok

    def current_step(self) -> int:
        """Committed steps, as ``torchft.Manager.current_step()``."""
        return self.step


def snapshot(model: torch.nn.Module, opt: gc.ChainedOptimizer) -> list:
    """Every tensor and number of the training state: weights, AdamW state, chain state."""
    return optree.tree_leaves(copy.deepcopy((model.state_dict(), opt.state_dict())))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--refuse-every", type=int, default=6, help="refuse every k-th vote")
    parser.add_argument(
        "--nan-steps",
        type=int,
        nargs="*",
        default=[10, 80],
        help="steps whose gradients get a nan (skipped by the chain)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a model this small gains nothing from more threads
    torch.manual_seed(args.seed)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=args.seed, stratify=y
    )
    x_train, x_test = (torch.tensor(a / 16, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    manager = StandInManager(
        refuse=set(range(args.refuse_every, 10 * args.steps, args.refuse_every))
    )
    opt = gc.ChainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        gc.chain(gc.skip_if_nonfinite(), gc.clip_by_norm(1.0)),
        should_commit=manager.should_commit,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    refused = refused_untouched = chain_skipped = 0
    for step in range(args.steps):
        manager.start_quorum()
        opt.zero_grad()
        idx = torch.randint(0, len(x_train), (args.batch_size,))
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        if step in args.nan_steps:
            model[0].weight.grad[0, 0] = float("nan")  # e.g. a bad all-reduce

        before, votes = snapshot(model, opt), manager.votes  # only to check what a refusal does
        opt.step()  # chain applies? then vote; committed? then AdamW steps
        opt.step_scheduler(sched)  # only on committed steps

        if manager.votes == votes:
            chain_skipped += 1
            print(f"step {step:3d}: nan gradients, skipped by the chain, no vote taken")
        elif not opt.last_step_applied:
            refused += 1
            untouched = same(before, snapshot(model, opt))
            refused_untouched += untouched
            if refused <= 3:
                print(
                    f"step {step:3d}: commit refused, weights, AdamW state and chain state "
                    f"unchanged: {untouched}"
                )

    adamw_steps = int(opt.state[model[0].weight]["step"])
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(
        f"steps: {args.steps}, skipped by the chain: {chain_skipped}, votes: {manager.votes}, "
        f"committed: {manager.current_step()}, refused: {refused}"
    )
    print(f"refused steps that changed nothing: {refused_untouched}/{refused}")
    print(
        f"committed steps: manager {manager.current_step()}, AdamW {adamw_steps}, "
        f"LR scheduler {sched.last_epoch}"
    )
    print(f"skip counter in the chain state: {int(gc.tree_get(opt.tx_state, 'total_skips'))}")
    print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
