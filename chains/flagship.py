"""Flagship recipe: functional training with a gradchain chain.

Trains a small MLP on the handwritten digits that scikit-learn ships (no download), in
functional style: parameters are a plain dict, gradients come from ``torch.func.grad``
over ``torch.func.functional_call``, and one pure chain turns them into updates:

    chain(skip_if_nonfinite(), clip_by_norm(1.0), accumulate_every(4), adamw(...))

Run it with ``python chains/flagship.py`` (add ``--help`` for options). It prints the
test accuracy, which should reach at least 90%.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.func import functional_call, grad

import gradchain as gc


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = make_model()
    params = {k: v.detach() for k, v in model.named_parameters()}

    steps_per_epoch = -(-len(x_train) // args.batch_size)
    windows = args.epochs * -(-steps_per_epoch // args.accumulate)
    tx = gc.chain(
        gc.skip_if_nonfinite(),
        gc.clip_by_norm(1.0),
        gc.accumulate_every(args.accumulate),
        gc.adamw(lr=gc.warmup_cosine_decay_schedule(0.0, args.lr, windows // 10, windows),
                 weight_decay=1e-4),
    )
    state = tx.init(params)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    grad_fn = grad(loss_fn)
    applied_steps = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            grads = grad_fn(params, x_train[idx], y_train[idx])
            last = i == steps_per_epoch - 1
            # flush=True closes the epoch's last, partial window with its exact mean.
            updates, state = tx.update(grads, state, params, flush=last)
            params = gc.apply_updates(params, updates)
            applied_steps += int(gc.applied(state))
        with torch.no_grad():
            loss = loss_fn(params, x_train, y_train)
        print(f"epoch {epoch + 1:2d}  train loss {loss:.4f}")
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        pred = functional_call(model, params, (x_test,)).argmax(dim=1)
    accuracy = (pred == y_test).float().mean().item()
    skipped = int(gc.tree_get(state, "total_skips"))
    print(f"applied updates: {applied_steps}, skipped non-finite steps: {skipped}")
    print(f"time: {elapsed:.1f}s")
    print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
